//! `fieldlink-cloud` command line.
//!
//! The configuration comes from `--config FILE` when given; otherwise from the environment variable
//! `FIELDLINK_CLOUD_CONFIG` (the TOML text itself: containers and ECS task definitions pass it without a mounted
//! file) when set; otherwise from `/etc/fieldlink/cloud.toml`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use fieldlink_cloud::config::{Config, ConfigError, EXAMPLE};
use std::path::PathBuf;

/// The environment variable that holds the whole configuration (TOML text) when `--config` is not given.
const CONFIG_ENV: &str = "FIELDLINK_CLOUD_CONFIG";
/// The configuration file when neither `--config` nor `FIELDLINK_CLOUD_CONFIG` is given.
const DEFAULT_CONFIG: &str = "/etc/fieldlink/cloud.toml";

// musl's allocator made the cloud benchmark several times slower than glibc's (docs/deploy.md): the static builds
// use mimalloc.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// Configuration file [default: $FIELDLINK_CLOUD_CONFIG (the TOML text) if set, else
        /// /etc/fieldlink/cloud.toml].
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Run only the compactor: publish the closed hours of the Parquet landing area as one bronze file per
    /// hour (only the process holding the compactor lease works; the others wait for it).
    Compact {
        /// Configuration file [default: $FIELDLINK_CLOUD_CONFIG (the TOML text) if set, else
        /// /etc/fieldlink/cloud.toml].
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// One round, then exit (status 1 if it failed or the lease was not free within three lease durations).
        /// Serves no metrics endpoint.
        #[arg(long)]
        once: bool,
        /// Serve metrics and health here instead of the config's `metrics_listen` (a compactor beside `run` on
        /// one host, sharing its config).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Validate a configuration; exit status 1 on any problem.
    CheckConfig {
        /// Configuration file [default: $FIELDLINK_CLOUD_CONFIG (the TOML text) if set, else
        /// /etc/fieldlink/cloud.toml].
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Print a documented example configuration.
    GenerateConfig,
}

/// Where the configuration comes from.
#[derive(Debug, PartialEq, Eq)]
enum Source {
    /// A file (`--config`, or the default path).
    File(PathBuf),
    /// The TOML text of `$FIELDLINK_CLOUD_CONFIG`.
    Env(String),
}

impl Source {
    /// `--config` wins; then the environment variable (`env`: its value, `Err` if set but not UTF-8); then the
    /// default file.
    fn choose(
        flag: Option<PathBuf>,
        env: Option<Result<String, std::ffi::OsString>>,
    ) -> Result<Self, String> {
        match (flag, env) {
            (Some(path), _) => Ok(Self::File(path)),
            (None, Some(Ok(text))) => Ok(Self::Env(text)),
            (None, Some(Err(_))) => Err(format!("${CONFIG_ENV}: not valid UTF-8")),
            (None, None) => Ok(Self::File(DEFAULT_CONFIG.into())),
        }
    }

    /// From the command line's `--config` and the process environment.
    fn from_process(flag: Option<PathBuf>) -> Result<Self, String> {
        Self::choose(
            flag,
            std::env::var_os(CONFIG_ENV).map(std::ffi::OsString::into_string),
        )
    }

    /// How errors name it: the path, or `$FIELDLINK_CLOUD_CONFIG`.
    fn name(&self) -> String {
        match self {
            Self::File(path) => path.display().to_string(),
            Self::Env(_) => format!("${CONFIG_ENV}"),
        }
    }

    fn load(&self) -> Result<Config, ConfigError> {
        match self {
            Self::File(path) => Config::load(path),
            Self::Env(text) => Config::from_toml(text),
        }
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::GenerateConfig => {
            print!("{EXAMPLE}");
            Ok(())
        }
        Command::CheckConfig { config } => {
            let source = Source::from_process(config).unwrap_or_else(|e| {
                eprintln!("{e}");
                std::process::exit(1);
            });
            match source.load() {
                Ok(cfg) => {
                    println!(
                        "{}: OK (stream {}, timestream {}, parquet {})",
                        source.name(),
                        cfg.kinesis.stream,
                        cfg.timestream
                            .as_ref()
                            .map_or("off".to_owned(), |t| format!("{}.{}", t.database, t.table)),
                        cfg.parquet.as_ref().map_or("off", |p| p.location.as_str())
                    );
                    Ok(())
                }
                Err(e) => {
                    eprintln!("{}: {e}", source.name());
                    std::process::exit(1);
                }
            }
        }
        Command::Run { config } => {
            let source = Source::from_process(config).map_err(anyhow::Error::msg)?;
            let cfg = source
                .load()
                .with_context(|| format!("configuration {}", source.name()))?;
            cfg.log.init();
            fieldlink_ops::shutdown::run_until_signal(None, |cancel| {
                fieldlink_cloud::run(cfg, cancel)
            })
            .context("starting the async runtime")??;
            Ok(())
        }
        Command::Compact {
            config,
            once,
            metrics_listen,
        } => {
            let source = Source::from_process(config).map_err(anyhow::Error::msg)?;
            let mut cfg = source
                .load()
                .with_context(|| format!("configuration {}", source.name()))?;
            if let Some(addr) = metrics_listen {
                cfg.metrics_listen = addr;
            }
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_takes_its_own_metrics_address() {
        let cli = Cli::try_parse_from([
            "fieldlink-cloud",
            "compact",
            "--metrics-listen",
            "127.0.0.1:9101",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Compact { once: false, metrics_listen: Some(a), .. } if a.port() == 9101
        ));
        assert!(Cli::try_parse_from([
            "fieldlink-cloud",
            "compact",
            "--metrics-listen",
            "not-an-address"
        ])
        .is_err());
    }

    #[test]
    fn the_flag_wins_over_the_environment() {
        assert_eq!(
            Source::choose(Some("a.toml".into()), Some(Ok("x = 1".into()))),
            Ok(Source::File("a.toml".into()))
        );
    }

    #[test]
    fn the_environment_gives_the_text_when_there_is_no_flag() {
        let s = Source::choose(None, Some(Ok("x = 1".into()))).unwrap();
        assert_eq!(s, Source::Env("x = 1".into()));
        assert_eq!(s.name(), "$FIELDLINK_CLOUD_CONFIG");
    }

    #[test]
    fn neither_means_the_default_file() {
        assert_eq!(
            Source::choose(None, None),
            Ok(Source::File("/etc/fieldlink/cloud.toml".into()))
        );
    }

    #[test]
    fn a_non_utf8_variable_is_refused_by_name() {
        let e = Source::choose(None, Some(Err("\u{fffd}".into()))).unwrap_err();
        assert_eq!(e, "$FIELDLINK_CLOUD_CONFIG: not valid UTF-8");
    }

    #[test]
    fn the_environment_text_is_parsed_and_validated_like_a_file() {
        let ok = Source::Env(EXAMPLE.into()).load().unwrap();
        assert_eq!(ok.kinesis.stream, "fieldlink-demo");
        let e = Source::Env("[kinesis]\nstream = \"\"\n".into())
            .load()
            .unwrap_err()
            .to_string();
        assert!(e.contains("kinesis.stream"), "{e}");
    }
}
