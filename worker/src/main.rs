//! `worker`: one fleet worker serving the default rooms app (see `worker::cli`).

fn main() -> std::process::ExitCode {
    worker::main(worker::RoomsApp)
}
