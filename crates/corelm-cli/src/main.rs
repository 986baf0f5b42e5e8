//! `corelm`: convert, inspect, verify and run Core ML language models.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use corelm_format::inspect::Report;
use corelm_format::mil::printer::program_text;
use corelm_format::Package;

#[derive(Parser)]
#[command(name = "corelm", version, about = "Large language models to Core ML ML Programs, without Python")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what a package holds: target, functions, inputs, states, outputs, ops, metadata,
    /// weights, and any problem found (exit code 1 when there is one).
    Inspect {
        /// The .mlpackage folder.
        package: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Print the program as MIL text.
        #[arg(long, conflicts_with = "json")]
        mil: bool,
    },
    /// Check packages against the format rules; exits 1 if any problem is found.
    Validate {
        /// One or more .mlpackage folders.
        #[arg(required = true)]
        packages: Vec<PathBuf>,
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn open(path: &PathBuf) -> Result<Package> {
    Package::open(path).with_context(|| format!("cannot read package {}", path.display()))
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Inspect { package, json, mil } => {
            let pkg = open(&package)?;
            if mil {
                print!("{}", program_text(&pkg.model().program));
                return Ok(ExitCode::SUCCESS);
            }
            let report = Report::new(&pkg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(if report.issues.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Validate { packages, json } => {
            let mut results = Vec::new();
            let mut failed = false;
            for path in &packages {
                let (issues, error) = match Package::open(path) {
                    Ok(pkg) => (pkg.validate().iter().map(|i| i.to_string()).collect::<Vec<_>>(), None),
                    Err(e) => (vec![], Some(e.to_string())),
                };
                failed |= error.is_some() || !issues.is_empty();
                if !json {
                    match (&error, issues.is_empty()) {
                        (Some(e), _) => eprintln!("{}: error: {e}", path.display()),
                        (None, true) => println!("{}: valid", path.display()),
                        (None, false) => {
                            println!("{}: {} problem(s)", path.display(), issues.len());
                            for i in &issues {
                                println!("  {i}");
                            }
                        }
                    }
                }
                results.push(serde_json::json!({
                    "path": path.display().to_string(),
                    "valid": error.is_none() && issues.is_empty(),
                    "error": error,
                    "issues": issues,
                }));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            }
            Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
