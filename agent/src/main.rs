//! `fieldlink-agent` command line.

use anyhow::Context;
use clap::{Parser, Subcommand};
use fieldlink_agent::config::{Config, EXAMPLE};
use std::path::PathBuf;

// The static (musl) builds' allocator is mimalloc: it ran the agent's pipeline 1.02–1.38× as fast as musl's own
// (docs/memory.md, "The static builds' allocator"). The cloud's static builds use it too.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Memory settings, first thing in `main`.
///
/// Transparent huge pages off for the process: the kernel would back 2 MiB-aligned anonymous memory with 2 MiB
/// pages, on `transparent_hugepage=always` hosts (RHEL's default) whatever the allocator asks; mimalloc's arenas
/// then put the agent's peak RSS at 41 MiB instead of 15. An agent this small gains nothing from them. (Fails on
/// kernels before 3.15, which lack the flag, or under a seccomp filter that refuses it: the agent then runs as it
/// would have.)
fn tune_memory() {
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    tune_allocator();
}

/// mimalloc gives memory it freed back to the OS `purge_delay` ms later (1000 by default). At 25 the agent's peak
/// RSS is musl's allocator's and the pipeline faster than with musl's; at 1000 the peak is up to 3 MiB higher, at 0
/// (purge at every free) the pipeline is slower than with musl's (docs/memory.md). Set as the default: an operator's
/// `MIMALLOC_PURGE_DELAY` (read when the process loads) still rules.
#[cfg(target_env = "musl")]
#[allow(unsafe_code)]
fn tune_allocator() {
    /// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (15 since mimalloc 2.1, v3 included; the sys crate
    /// names only older options).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets an option's default value. mimalloc's option setters are not thread-safe: this runs first in
    // `main`, before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set_default(MI_OPTION_PURGE_DELAY, 25) };
}

#[cfg(not(target_env = "musl"))]
fn tune_allocator() {}

#[derive(Debug, Parser)]
#[command(
    name = "fieldlink-agent",
    version,
    about = "fieldlink edge agent: MQTT in, SQLite buffer, zstd batches to Kinesis"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        /// Configuration file.
        #[arg(short, long, default_value = "/etc/fieldlink/agent.toml")]
        config: PathBuf,
    },
    /// Validate a configuration file and print every problem; exit status 1 if there is any.
    CheckConfig {
        /// Configuration file.
        #[arg(short, long, default_value = "/etc/fieldlink/agent.toml")]
        config: PathBuf,
    },
    /// Print a documented example configuration.
    GenerateConfig,
    /// Print the newest source messages the payload mapping refused (topic, reason, payload), one JSON object
    /// per line, oldest first. Reads the buffer file; the agent may be running.
    Refused {
        /// Configuration file (for the buffer's path).
        #[arg(short, long, default_value = "/etc/fieldlink/agent.toml")]
        config: PathBuf,
        /// How many of the newest to print.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

fn main() -> anyhow::Result<()> {
    tune_memory();
    let cli = Cli::parse();
    match cli.command {
        Command::GenerateConfig => {
            print!("{EXAMPLE}");
            Ok(())
        }
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(cfg) => {
                println!(
                    "{}: OK (agent {}, {} MQTT connection(s), {} Modbus device(s), buffer {}, stream {})",
                    config.display(),
                    cfg.agent_id,
                    cfg.mqtt.len(),
                    cfg.modbus.len(),
                    cfg.buffer.path.display(),
                    cfg.kinesis.stream
                );
                for device in &cfg.modbus {
                    for line in fieldlink_agent::modbus::compile(device).describe() {
                        println!("{line}");
                    }
                }
                Ok(())
            }
            Err(e) => {
                eprintln!("{}: {e}", config.display());
                std::process::exit(1);
            }
        },
        Command::Refused { config, limit } => {
            let cfg = Config::load(&config)
                .with_context(|| format!("configuration {}", config.display()))?;
            let rows = fieldlink_agent::buffer::read_refused(&cfg.buffer.path, limit)
                .with_context(|| format!("reading {}", cfg.buffer.path.display()))?;
            for row in rows {
                println!("{}", serde_json::to_string(&row)?);
            }
            Ok(())
        }
        Command::Run { config } => {
            let cfg = Config::load(&config)
                .with_context(|| format!("configuration {}", config.display()))?;
            cfg.log.init();
            fieldlink_ops::shutdown::run_until_signal(Some(1), |cancel| {
                fieldlink_agent::run(cfg, cancel)
            })
            .context("starting the async runtime")??;
            Ok(())
        }
    }
}
