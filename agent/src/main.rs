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
    /// Before a buffer file is given up (a gateway re-imaged, replaced or retired, an SD card swapped), with the
    /// agent stopped: close every open window, seal everything and send it to Kinesis. Exit status 0 once the file
    /// holds nothing Kinesis has not acknowledged, 3 if something is left at the timeout (what, on stdout), 1 on
    /// an error (the agent still running holds the buffer's lock).
    Drain {
        /// Configuration file.
        #[arg(short, long, default_value = "/etc/fieldlink/agent.toml")]
        config: PathBuf,
        /// Stop sending after this many seconds (opening and sealing the buffer come first).
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
    },
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
    // SAFETY: first in `main`, before any other thread exists.
    #[allow(unsafe_code)]
    let memory = unsafe { fieldlink_agent::memory::tune() };
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
                for w in cfg.warnings() {
                    println!("warning: {w}");
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
        Command::Drain { config, timeout_s } => {
            let cfg = Config::load(&config)
                .with_context(|| format!("configuration {}", config.display()))?;
            cfg.log.init();
            let path = cfg.buffer.path.clone();
            let left = fieldlink_ops::shutdown::run_until_signal(Some(1), |cancel| {
                fieldlink_agent::drain(cfg, std::time::Duration::from_secs(timeout_s), cancel)
            })
            .context("starting the async runtime")??;
            println!("{}", drain_report(&path, &left));
            if !left.is_drained() {
                std::process::exit(3);
            }
            Ok(())
        }
        Command::Run { config } => {
            let cfg = Config::load(&config)
                .with_context(|| format!("configuration {}", config.display()))?;
            cfg.log.init();
            tracing::info!(
                huge_pages_off = memory.huge_pages_off,
                allocator = memory.allocator,
                purge_delay_ms = ?memory.purge_delay_ms,
                "memory settings"
            );
            fieldlink_ops::shutdown::run_until_signal(Some(1), |cancel| {
                fieldlink_agent::run(cfg, cancel)
            })
            .context("starting the async runtime")??;
            Ok(())
        }
    }
}

/// What `drain` prints: whether the file may go, what is left, and what only the file holds.
fn drain_report(path: &std::path::Path, left: &fieldlink_agent::buffer::Left) -> String {
    let mut out = if left.is_drained() {
        format!(
            "drained: {} holds nothing Kinesis has not acknowledged",
            path.display()
        )
    } else {
        format!(
            "not drained: {} holds {} unsealed readings, {} records ({} readings) and {} alarm records Kinesis has \
             not acknowledged, {} open windows; keep the file and run drain again once Kinesis can be reached (or \
             start the agent)",
            path.display(),
            left.unsealed_readings,
            left.pending_batches,
            left.pending_readings,
            left.alarm_records,
            left.open_windows
        )
    };
    if left.acknowledged_undeleted > 0 {
        out.push_str(&format!(
            "\n{} records Kinesis acknowledged are still in the file: deleting them failed (another process held \
             its lock?); an agent run on it sends them again, and the cloud skips the copies",
            left.acknowledged_undeleted
        ));
    }
    if let Some(aside) = &left.moved_aside {
        out.push_str(&format!(
            "\nthe file was damaged: the agent moved it aside to {} (what it held is there, not drained)",
            aside.display()
        ));
    }
    if left.window_states_unloaded > 0 {
        out.push_str(&format!(
            "\n{} window states this agent cannot send: unreadable, or with open windows of a removed rule whose \
             functions it does not know (configure the rule again to send them)",
            left.window_states_unloaded
        ));
    }
    if left.dead_letters + left.refused > 0 {
        out.push_str(&format!(
            "\nkept only in the file: {} dead-lettered readings, {} refused source messages (`fieldlink-agent refused` \
             prints those)",
            left.dead_letters, left.refused
        ));
    }
    out
}
