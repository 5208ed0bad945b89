//! The chat example as a fleet worker: `chat --config fleet.yaml --index 0`, as the balancer
//! runs it with `workers.command: [chat]`; or standalone (`chat --help`).

fn main() -> std::process::ExitCode {
    worker::main(chat::app())
}
