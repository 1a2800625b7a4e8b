use clap::Parser;

fn main() {
    let cli = kd_engine::cli::Cli::parse();
    if let Err(e) = kd_engine::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
