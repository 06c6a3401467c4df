fn main() {
    std::process::exit(netctl::cli::main());
}
