//! Process memory settings shared by the agent's binary and the benchmark (`docs/memory.md`): transparent huge
//! pages off, and in the static (musl) builds, whose allocator is mimalloc, its purge delay.

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
