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
    Crds {
        /// Write one file per kind into this directory (as kept in `crds/`) instead of printing.
        #[arg(long, value_name = "DIR")]
        output_dir: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds { output_dir } => print_or_write_crds(output_dir.as_deref()),
    }
}

fn print_or_write_crds(output_dir: Option<&std::path::Path>) -> ExitCode {
    use gitlab_registry_operator::crd;
    let Some(dir) = output_dir else {
        return match crd::all_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: cannot render the CRDs as YAML: {error}");
                ExitCode::FAILURE
            }
        };
    };
    for (file, definition) in crd::all() {
        let path = dir.join(file);
        let written = crd::to_yaml(&definition)
            .map_err(|error| error.to_string())
            .and_then(|yaml| std::fs::write(&path, yaml).map_err(|error| error.to_string()));
        if let Err(error) = written {
            eprintln!("error: cannot write {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
