//! Process memory settings shared by the agent's binary and the benchmark (`docs/memory.md`): transparent huge
//! pages off, and in the static (musl) builds, whose allocator is mimalloc, its purge delay; and [`GiveBack`],
//! which hands the free memory of a thread doing bulk work back to the OS once a second.

/// The process's memory settings.
///
/// # Safety
/// Call it first in `main`, before any other thread exists: mimalloc's option setters write without
/// synchronisation, so a thread reading the options meanwhile would race with them.
///
/// Transparent huge pages off for the process: the kernel would back 2 MiB-aligned anonymous memory with 2 MiB
/// pages, on `transparent_hugepage=always` hosts (RHEL's default) whatever the allocator asks; mimalloc's arenas
/// then put the agent's peak RSS at 41 MiB instead of 15. An agent this small gains nothing from them. (Fails on
/// kernels before 3.15, which lack the flag, or under a seccomp filter that refuses it: the agent then runs as it
/// would have.)
#[allow(unsafe_code)]
pub unsafe fn tune() -> Settings {
    let huge_pages_off = rustix::thread::disable_transparent_huge_pages(true).is_ok();
    Settings {
        huge_pages_off,
        allocator: ALLOCATOR,
        purge_delay_ms: tune_allocator(),
    }
}

/// What [`tune`] set, for the agent's start-up log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Transparent huge pages are off for the process.
    pub huge_pages_off: bool,
    /// The global allocator the binaries of this workspace declare: mimalloc in the static (musl) builds, the C
    /// library's otherwise. (Set by target, not read from the binary: a musl binary using this library without
    /// declaring mimalloc would be misreported.)
    pub allocator: &'static str,
    /// mimalloc's purge delay in effect (its default as set here, or `MIMALLOC_PURGE_DELAY`); `None` without
    /// mimalloc. (mimalloc waits this long before purging a page; memory of its arenas waits this times
    /// `arena_purge_mult`, 10 by default.)
    pub purge_delay_ms: Option<i64>,
}

#[cfg(target_env = "musl")]
const ALLOCATOR: &str = "mimalloc";
#[cfg(not(target_env = "musl"))]
const ALLOCATOR: &str = "libc";

/// mimalloc gives memory it freed back to the OS `purge_delay` ms later (1000 by default). At 25 the agent's peak
/// RSS is musl's allocator's and the pipeline faster than with musl's; at 1000 the peak is up to 3 MiB higher, at 0
/// (purge at every free) the pipeline is slower than with musl's (docs/memory.md). Set as the default: an operator's
/// `MIMALLOC_PURGE_DELAY` (read when the process loads) still rules.
#[cfg(target_env = "musl")]
#[allow(unsafe_code)]
#[allow(clippy::useless_conversion)] // `c_long` is `i64` on 64-bit targets only
fn tune_allocator() -> Option<i64> {
    /// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (15 since mimalloc 2.1, v3 included; the sys crate
    /// names only older options).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets an option's default value. mimalloc's option setters are not thread-safe: `tune`'s callers
    // run it before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set_default(MI_OPTION_PURGE_DELAY, 25) };
    // SAFETY: reads an option (initialising it from the environment if not yet done).
    Some(i64::from(unsafe {
        libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY)
    }))
}

#[cfg(not(target_env = "musl"))]
fn tune_allocator() -> Option<i64> {
    None
}

/// How often a thread doing bulk work ([`GiveBack::tick`]) hands the memory its allocator holds free back to the
/// OS, at most.
pub const GIVE_BACK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Hands back, at most once per [`GIVE_BACK_EVERY`], the memory the calling thread's allocator heap holds free:
/// pages emptied by freed objects (also those freed by other threads, which mimalloc only queues), and pages kept
/// for reuse. The buffer and seal threads tick it after each part of a seal (so what an idle agent's last part
/// left waits for the next part). Without it, the few MB a seal that catches up after a stall (a slow `fsync`, a
/// busy host) allocates at once stayed resident for good: after a 2 s stall the agent's RSS stayed 3.5–4 MiB
/// higher (docs/memory.md). Once a second is two calls a second (their cost not measured: the pipeline benches
/// drive the buffer without these threads); after every part, at the pipeline's rate (a hundred parts a second),
/// it would purge pages the next part faults in again. A no-op with the C library's allocator (the glibc builds).
#[derive(Debug, Default)]
pub struct GiveBack {
    last: Option<std::time::Instant>,
}

impl GiveBack {
    /// After a unit of work on this thread: gives back if the last time was [`GIVE_BACK_EVERY`] ago or more.
    /// Returns whether it did.
    pub fn tick(&mut self) -> bool {
        if self.last.is_some_and(|t| t.elapsed() < GIVE_BACK_EVERY) {
            return false;
        }
        self.last = Some(std::time::Instant::now());
        collect();
        true
    }
}

#[cfg(target_env = "musl")]
#[allow(unsafe_code)]
fn collect() {
    // SAFETY: collects the calling thread's own mimalloc heap and purges the process's arenas (thread-safe); it
    // only reads mimalloc's options, whose setters `tune` ran before any thread existed.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

#[cfg(not(target_env = "musl"))]
fn collect() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_given_back_at_the_first_tick_then_once_per_interval() {
        let mut g = GiveBack::default();
        assert!(g.tick(), "the first tick gives back");
        assert!(!g.tick(), "not again within the interval");
        g.last = g.last.and_then(|t| t.checked_sub(GIVE_BACK_EVERY));
        assert!(g.tick(), "once the interval has passed");
    }
}
