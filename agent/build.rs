//! Lays out the agent's machine code for the static builds we ship (musl, and armv7 against glibc; release-based
//! profiles): the functions the agent runs first, together, so the kernel maps them and not the rest.
//!
//! A process's code counts in its RSS by the kernel's fault-around windows (64 KiB): a function run once maps its
//! whole window. Linked in the compiler's order, the ~2.2 MiB of code the agent runs is spread over nearly all
//! of its 5.7 MiB, and ~5.5 MiB stayed resident. `deploy/hot-text/agent.order` (written by
//! `deploy/hot-text.sh` from traced runs) lists the functions run; this script turns it into a linker script that
//! places, in an output section `.text.hot` before `.text`: those functions by exact symbol (the traced target),
//! then the same names with what differs by target, compiler and dependency version as wildcards (a legacy
//! symbol's hash, a v0 symbol's crate disambiguators: `build/hot_text.rs`), then the `warm` globs. A stale list only costs memory: every function is still linked, anything unlisted goes
//! to `.text` as before. `FIELDLINK_HOT_TEXT=0` turns it off (the trace build itself).

#[path = "build/hot_text.rs"]
mod hot_text;

use std::env;
use std::path::PathBuf;

fn main() {
    let order = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"))
        .join("../deploy/hot-text/agent.order");
    println!("cargo:rerun-if-changed={}", order.display());
    println!("cargo:rerun-if-env-changed=FIELDLINK_HOT_TEXT");
    let var = |k: &str| env::var(k).unwrap_or_default();
    let shipped = var("CARGO_CFG_TARGET_OS") == "linux"
        && (var("CARGO_CFG_TARGET_ENV") == "musl" || var("CARGO_CFG_TARGET_ARCH") == "arm");
    if !shipped || var("PROFILE") != "release" || var("FIELDLINK_HOT_TEXT") == "0" {
        return;
    }
    let list = match std::fs::read_to_string(&order) {
        Ok(list) => list,
        Err(e) => {
            // A source tree without deploy/ (a crate copied alone): link in the compiler's order.
            println!("cargo:warning=no hot-text layout: {}: {e}", order.display());
            return;
        }
    };
    let script = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets it")).join("hot-text.ld");
    std::fs::write(&script, hot_text::linker_script(&list))
        .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    // `-T FILE` as two arguments: understood by cc drivers (zig cc, gcc) and by ld.lld/GNU ld alike.
    println!("cargo:rustc-link-arg-bin=fieldlink-agent=-T");
    println!(
        "cargo:rustc-link-arg-bin=fieldlink-agent={}",
        script.display()
    );
}
