//! The `locksmith` binary.

fn main() {
    println!(
        "locksmith {} — the WebSocket server (ws://localhost:8008/ws) is not built yet; \
         the lock manager library is in src/lock/",
        env!("CARGO_PKG_VERSION")
    );
}
