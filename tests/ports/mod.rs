//! Loopback ports for the servers a test starts.
//!
//! Asking the kernel for port 0 hands out a port from its ephemeral range, the same range it
//! draws from for outgoing connections: a Kafka client connecting in the moment between the
//! test choosing a port and the daemon binding it can take it. Ports here come from below that
//! range, so only another listener can hold one, and a bind check rules that out.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port handed out.
const FIRST: u32 = 20_000;

/// How many ports from `FIRST` are used; the range ends below Linux's default ephemeral range
/// (32768–60999).
const SPAN: u32 = 12_000;

/// A loopback port outside the ephemeral range that nothing listens on now. Successive calls in
/// one process never repeat a port until the range wraps; the process id spreads test binaries
/// apart.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    loop {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(FIRST + (start + offset) % SPAN).expect("port below 32000");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
