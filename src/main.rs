//! The `gitlab-registry-operator` command line: `crds`, and (as they land) `run`, `apply`,
//! `plan` and `sim`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "gitlab-registry-operator",
    version,
    about = "Keeps GitLab container virtual registries, upstreams and tag cleanups in line with Kubernetes objects"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions of all three kinds as YAML (`---`-separated).
    Crds,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds => match gitlab_registry_operator::crd::all_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: cannot render the CRDs as YAML: {error}");
                ExitCode::FAILURE
            }
        },
    }
}
