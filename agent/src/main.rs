use clap::Parser;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = agent::cli::Cli::parse();
    if let Err(err) = agent::cli::run(cli) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
