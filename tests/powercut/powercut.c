/* powercut.so: an LD_PRELOAD library that lets a test cut the power under a process's files.
 *
 * For every file whose path starts with $POWERCUT_PREFIX (the buffer's database, its -wal and its lock file;
 * the -shm file, SQLite's memory-mapped index that it rebuilds at the first open, is left alone), each write and
 * truncation first appends to an undo journal in $POWERCUT_JOURNAL the bytes it is about to replace and the
 * file's size before it. An fsync of the file empties its journal: what the file held at that moment is on the
 * disk. After the process is killed (SIGKILL: the kernel's page cache, hence the files, stay as they were), the
 * test applies the journals backwards (tests/src/powercut.rs) and the files hold what a power cut would have left:
 * every write since their last fsync lost, or only the later part of them.
 *
 * Journal record: u64 offset, u64 length, u64 size before, then `length` bytes (native byte order). A record cut
 * short by the kill is ignored by the reader: the write it precedes never happened.
 *
 * A watched file that did not exist before its open is marked created (`<name>.created` beside the journals)
 * until the directory it is in is synced: a cut removes it, as a power cut can take a directory entry that never
 * reached the disk.
 *
 * With $POWERCUT_KILL_AT = N the process kills itself (SIGKILL) right after its Nth write or truncation of a
 * watched file other than the lock file: a cut in the middle of a transaction or a checkpoint, where a timer
 * would mostly land between them. With $POWERCUT_KILL_FILE set, it does so right after the first such write
 * made while that file exists (a test running the process for a while creates it when it wants the cut).
 *
 * The process's writes keep their meaning: only the journal is added, under one lock. Intercepted: open,
 * open64, pwrite64, pwrite, write, ftruncate64, ftruncate, fsync, fdatasync, close (what SQLite and Rust's
 * std call on Linux with glibc). writev, pwritev, fallocate and O_TRUNC on a watched file abort the process: they
 * are not journalled, and a test must not pass unjournalled writes as durable. Not modelled: renames and removals,
 * memory-mapped writes, and torn sectors inside one write. */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_FD 4096

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
/* The journal's descriptor + 1 for each tracked descriptor, 0 for any other. */
static int journal_of[MAX_FD];
/* Whether a tracked descriptor is the lock file's (its writes do not count towards $POWERCUT_KILL_AT). */
static char is_lock[MAX_FD];
/* Whether a descriptor is the watched files' directory. */
static char is_dir[MAX_FD];
/* Writes and truncations of watched files other than the lock file so far. */
static long writes;

static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off64_t);
static ssize_t (*real_write)(int, const void *, size_t);
static int (*real_ftruncate64)(int, off64_t);
static int (*real_ftruncate)(int, off_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_close)(int);

#define REAL(name)                                                                                                \
    do {                                                                                                          \
        if (!real_##name)                                                                                         \
            real_##name = dlsym(RTLD_NEXT, #name);                                                                \
    } while (0)

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* Whether `path` names a watched file. */
static int watched(const char *path) {
    const char *prefix = getenv("POWERCUT_PREFIX");
    return prefix && strncmp(path, prefix, strlen(prefix)) == 0 && !ends_with(path, "-shm");
}

/* Whether `path` is the directory the watched files are in. */
static int watched_dir(const char *path) {
    const char *prefix = getenv("POWERCUT_PREFIX");
    const char *slash = prefix ? strrchr(prefix, '/') : NULL;
    return slash && strlen(path) == (size_t)(slash - prefix) && strncmp(path, prefix, (size_t)(slash - prefix)) == 0;
}

/* `<journal directory>/<file name of path><suffix>`, or 0 if it does not fit. */
static int journal_name(char *out, size_t cap, const char *path, const char *suffix) {
    const char *dir = getenv("POWERCUT_JOURNAL");
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    if (!dir || strlen(dir) + 1 + strlen(base) + strlen(suffix) + 1 > cap)
        return 0;
    strcpy(out, dir);
    strcat(out, "/");
    strcat(out, base);
    strcat(out, suffix);
    return 1;
}

/* Starts tracking `fd` if `path` is one of the watched files (`created`: it did not exist before this open) or
 * their directory. */
static void track(int fd, const char *path, int created) {
    if (fd < 0 || fd >= MAX_FD)
        return;
    if (watched_dir(path)) {
        is_dir[fd] = 1;
        return;
    }
    char name[4096];
    if (!watched(path) || !journal_name(name, sizeof name, path, ".undo"))
        return;
    REAL(open);
    REAL(close);
    if (created) {
        char marker[4096];
        if (!journal_name(marker, sizeof marker, path, ".created"))
            abort();
        int m = real_open(marker, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
        if (m < 0)
            abort();
        real_close(m);
    }
    int j = real_open(name, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (j < 0)
        abort(); /* a test that cannot journal must not pass as one that cut the power */
    pthread_mutex_lock(&mu);
    journal_of[fd] = j + 1;
    is_lock[fd] = ends_with(path, ".lock");
    pthread_mutex_unlock(&mu);
}

/* The directory was synced: the files created in it so far keep their entries. */
static void dir_synced(void) {
    const char *dir = getenv("POWERCUT_JOURNAL");
    DIR *d = dir ? opendir(dir) : NULL;
    if (!d)
        abort();
    struct dirent *e;
    char name[4096];
    while ((e = readdir(d)) != NULL) {
        if (ends_with(e->d_name, ".created") && strlen(dir) + 1 + strlen(e->d_name) + 1 <= sizeof name) {
            strcpy(name, dir);
            strcat(name, "/");
            strcat(name, e->d_name);
            unlink(name);
        }
    }
    closedir(d);
}

static void write_all(int j, const void *buf, size_t len) {
    REAL(write);
    const char *p = buf;
    while (len > 0) {
        ssize_t w = real_write(j, p, len);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            abort();
        p += w;
        len -= (size_t)w;
    }
}

/* Journals the bytes of [off, off + len) the file holds now and its size. Called with `mu` held. */
static void save(int fd, int j, uint64_t off, uint64_t len) {
    struct stat st;
    if (fstat(fd, &st) != 0)
        abort();
    uint64_t size = (uint64_t)st.st_size;
    uint64_t have = off < size ? (len < size - off ? len : size - off) : 0;
    char *old = malloc(have ? have : 1);
    if (!old)
        abort();
    uint64_t got = 0;
    while (got < have) {
        ssize_t r = pread(fd, old + got, have - got, (off_t)(off + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            abort(); /* SQLite opens its files read-write; a write-only descriptor is not expected here */
        got += (uint64_t)r;
    }
    uint64_t head[3] = {off, have, size};
    char *rec = malloc(sizeof head + have);
    if (!rec)
        abort();
    memcpy(rec, head, sizeof head);
    memcpy(rec + sizeof head, old, have);
    write_all(j, rec, sizeof head + have); /* one write: a kill leaves a whole record or a short one */
    free(rec);
    free(old);
}

/* Called with `mu` held after a watched file changed. */
static void count(int fd) {
    if (is_lock[fd])
        return;
    writes++;
    const char *at = getenv("POWERCUT_KILL_AT");
    const char *file = getenv("POWERCUT_KILL_FILE");
    if ((at && writes == atol(at)) || (file && access(file, F_OK) == 0))
        kill(getpid(), SIGKILL);
}

static int journal(int fd) {
    return fd >= 0 && fd < MAX_FD ? journal_of[fd] - 1 : -1;
}

/* The mode argument of an open that creates. */
#define MODE_ARG(flags, mode)                                                                                     \
    do {                                                                                                          \
        if ((flags) & (O_CREAT | O_TMPFILE)) {                                                                    \
            va_list ap;                                                                                           \
            va_start(ap, flags);                                                                                  \
            mode = va_arg(ap, int);                                                                               \
            va_end(ap);                                                                                           \
        }                                                                                                         \
    } while (0)

static int open_with(int (*real)(const char *, int, ...), const char *path, int flags, mode_t mode) {
    if ((flags & O_TRUNC) && watched(path) && access(path, F_OK) == 0)
        abort(); /* a truncation at open is not journalled */
    int created = (flags & O_CREAT) && watched(path) && access(path, F_OK) != 0;
    int fd = real(path, flags, mode);
    track(fd, path, created);
    return fd;
}

int open(const char *path, int flags, ...) {
    mode_t mode = 0;
    MODE_ARG(flags, mode);
    REAL(open);
    return open_with(real_open, path, flags, mode);
}

int open64(const char *path, int flags, ...) {
    mode_t mode = 0;
    MODE_ARG(flags, mode);
    REAL(open64);
    return open_with(real_open64, path, flags, mode);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off) {
    REAL(pwrite64);
    pthread_mutex_lock(&mu);
    int j = journal(fd);
    if (j >= 0)
        save(fd, j, (uint64_t)off, n);
    ssize_t r = real_pwrite64(fd, buf, n, off);
    if (j >= 0)
        count(fd);
    pthread_mutex_unlock(&mu);
    return r;
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    return pwrite64(fd, buf, n, off);
}

ssize_t write(int fd, const void *buf, size_t n) {
    REAL(write);
    if (journal(fd) < 0)
        return real_write(fd, buf, n);
    pthread_mutex_lock(&mu);
    int j = journal(fd);
    if (j >= 0) {
        off_t at = (fcntl(fd, F_GETFL) & O_APPEND) ? lseek(fd, 0, SEEK_END) : lseek(fd, 0, SEEK_CUR);
        if (at < 0)
            abort();
        save(fd, j, (uint64_t)at, n);
    }
    ssize_t r = real_write(fd, buf, n);
    if (j >= 0)
        count(fd);
    pthread_mutex_unlock(&mu);
    return r;
}

int ftruncate64(int fd, off64_t len) {
    REAL(ftruncate64);
    pthread_mutex_lock(&mu);
    int j = journal(fd);
    if (j >= 0) {
        struct stat st;
        if (fstat(fd, &st) != 0)
            abort();
        uint64_t size = (uint64_t)st.st_size;
        save(fd, j, (uint64_t)len, (uint64_t)len < size ? size - (uint64_t)len : 0);
    }
    int r = real_ftruncate64(fd, len);
    if (j >= 0)
        count(fd);
    pthread_mutex_unlock(&mu);
    return r;
}

int ftruncate(int fd, off_t len) {
    return ftruncate64(fd, len);
}

/* Syncs under the lock, so that no write of another thread falls between the sync and the journal's truncation;
 * after a successful sync the file's content is on the disk and its journal starts again. */
static int sync_with(int (*real)(int), int fd) {
    REAL(ftruncate);
    pthread_mutex_lock(&mu);
    int r = real(fd);
    int j = journal(fd);
    if (r == 0 && j >= 0 && real_ftruncate(j, 0) != 0)
        abort();
    if (r == 0 && fd >= 0 && fd < MAX_FD && is_dir[fd])
        dir_synced();
    pthread_mutex_unlock(&mu);
    return r;
}

int fsync(int fd) {
    REAL(fsync);
    return sync_with(real_fsync, fd);
}

int fdatasync(int fd) {
    REAL(fdatasync);
    return sync_with(real_fdatasync, fd);
}

int close(int fd) {
    REAL(close);
    if (fd >= 0 && fd < MAX_FD)
        is_dir[fd] = 0;
    if (fd >= 0 && fd < MAX_FD && journal_of[fd]) {
        pthread_mutex_lock(&mu);
        int j = journal(fd);
        journal_of[fd] = 0;
        pthread_mutex_unlock(&mu);
        if (j >= 0)
            real_close(j);
    }
    return real_close(fd);
}

/* Not journalled: on a watched file, abort (see the top); on any other, the real call. */
static void refuse_watched(int fd) {
    if (journal(fd) >= 0)
        abort();
}

ssize_t writev(int fd, const struct iovec *iov, int n) {
    static ssize_t (*real)(int, const struct iovec *, int);
    if (!real)
        real = dlsym(RTLD_NEXT, "writev");
    refuse_watched(fd);
    return real(fd, iov, n);
}

ssize_t pwritev(int fd, const struct iovec *iov, int n, off_t off) {
    static ssize_t (*real)(int, const struct iovec *, int, off_t);
    if (!real)
        real = dlsym(RTLD_NEXT, "pwritev");
    refuse_watched(fd);
    return real(fd, iov, n, off);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int n, off64_t off) {
    static ssize_t (*real)(int, const struct iovec *, int, off64_t);
    if (!real)
        real = dlsym(RTLD_NEXT, "pwritev64");
    refuse_watched(fd);
    return real(fd, iov, n, off);
}

int fallocate(int fd, int mode, off_t off, off_t len) {
    static int (*real)(int, int, off_t, off_t);
    if (!real)
        real = dlsym(RTLD_NEXT, "fallocate");
    refuse_watched(fd);
    return real(fd, mode, off, len);
}

int posix_fallocate(int fd, off_t off, off_t len) {
    static int (*real)(int, off_t, off_t);
    if (!real)
        real = dlsym(RTLD_NEXT, "posix_fallocate");
    refuse_watched(fd);
    return real(fd, off, len);
}
