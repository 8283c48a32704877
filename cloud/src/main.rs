//! `fieldlink-cloud` command line.

use anyhow::Context;
use clap::{Parser, Subcommand};
use fieldlink_cloud::config::{Config, EXAMPLE};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "fieldlink-cloud",
    version,
    about = "fieldlink cloud consumer: Kinesis in, Timestream and Parquet out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the consumer.
    Run {
        /// Configuration file.
        #[arg(short, long, default_value = "/etc/fieldlink/cloud.toml")]
        config: PathBuf,
    },
    /// Run only the compactor: publish the closed hours of the Parquet landing area as one bronze file per
    /// hour (only the process holding the compactor lease works; the others wait for it).
    Compact {
        /// Configuration file.
        #[arg(short, long, default_value = "/etc/fieldlink/cloud.toml")]
        config: PathBuf,
        /// One round, then exit (status 1 if it failed or the lease was not free within three lease durations).
        #[arg(long)]
        once: bool,
    },
    /// Validate a configuration file; exit status 1 on any problem.
    CheckConfig {
        /// Configuration file.
        #[arg(short, long, default_value = "/etc/fieldlink/cloud.toml")]
        config: PathBuf,
    },
    /// Print a documented example configuration.
    GenerateConfig,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::GenerateConfig => {
            print!("{EXAMPLE}");
            Ok(())
        }
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(cfg) => {
                println!(
                    "{}: OK (stream {}, timestream {}, parquet {})",
                    config.display(),
                    cfg.kinesis.stream,
                    cfg.timestream
                        .as_ref()
                        .map_or("off".to_owned(), |t| format!("{}.{}", t.database, t.table)),
                    cfg.parquet.as_ref().map_or("off", |p| p.location.as_str())
                );
                Ok(())
            }
            Err(e) => {
                eprintln!("{}: {e}", config.display());
                std::process::exit(1);
            }
        },
        Command::Compact { config, once } => {
            let cfg = Config::load(&config)
                .with_context(|| format!("configuration {}", config.display()))?;
            cfg.log.init();
            let hours = fieldlink_ops::shutdown::run_until_signal(None, |cancel| {
                fieldlink_cloud::compact(cfg, once, cancel)
            })
            .context("starting the async runtime")??;
            if once {
                println!(
                    "published {hours} hours, peak RSS {} KiB",
                    fieldlink_cloud::compaction::peak_rss_kib()
                );
            }
            Ok(())
        }
        Command::Run { config } => {
            let cfg = Config::load(&config)
                .with_context(|| format!("configuration {}", config.display()))?;
            cfg.log.init();
            fieldlink_ops::shutdown::run_until_signal(None, |cancel| {
                fieldlink_cloud::run(cfg, cancel)
            })
            .context("starting the async runtime")??;
            Ok(())
        }
    }
}
