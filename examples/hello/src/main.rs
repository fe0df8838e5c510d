//! A WebAssembly command component for the edge orchestrator.
//!
//! Without arguments it greets and exits 0. The options make it behave the
//! ways a real workload might, which the tests use:
//!
//! ```text
//! --ticks N        print N tick lines (default 0)
//! --interval-ms M  wait M ms between ticks (default 1000)
//! --forever        tick until stopped
//! --sleep-ms M     wait M ms before exiting
//! --exit CODE      exit with CODE
//! --trap           execute an unreachable instruction
//! --alloc-mib N    allocate and touch N MiB
//! --spin           loop forever without yielding
//! --primes N       count the primes below N (pure computation, for
//!                  comparing how fast code runs on each node)
//! --cat PATH       print the file at PATH (a secret given as a file), or
//!                  why it cannot be read; repeatable
//! --write PATH     try to write to PATH and say whether it worked
//! ```

use std::time::Duration;

fn arg_value(args: &[String], name: &str) -> Option<u64> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}

/// Trial division: integer arithmetic and branches, no memory traffic and
/// no host calls, so its time is the execution engine's alone.
fn count_primes(below: u64) -> u64 {
    let mut count = 0;
    for n in 2..below {
        let mut d = 2;
        let mut prime = true;
        while d * d <= n {
            if n % d == 0 {
                prime = false;
                break;
            }
            d += 1;
        }
        count += u64::from(prime);
    }
    count
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let has = |name: &str| args.iter().any(|a| a == name);
    let node = std::env::var("EDGE_NODE").unwrap_or_else(|_| "an unknown node".into());
    let workload = std::env::var("EDGE_WORKLOAD").unwrap_or_else(|_| "hello".into());
    let greeting = std::env::var("GREETING").unwrap_or_else(|_| "Hello".into());
    println!("{greeting} from WebAssembly! I am {workload}, running on {node}.");
    if args.len() > 1 {
        println!("args: {:?}", &args[1..]);
    }

    if let Some(mib) = arg_value(&args, "--alloc-mib") {
        let mut blocks = Vec::new();
        for i in 0..mib {
            blocks.push(vec![i as u8; 1 << 20]);
        }
        println!("allocated {} MiB", blocks.len());
    }
    for (i, a) in args.iter().enumerate() {
        let Some(path) = args.get(i + 1) else { break };
        match a.as_str() {
            "--cat" => match std::fs::read_to_string(path) {
                Ok(text) => println!("{path}: {text}"),
                Err(e) => println!("{path}: cannot read: {e}"),
            },
            "--write" => match std::fs::write(path, "x") {
                Ok(()) => println!("{path}: written"),
                Err(e) => println!("{path}: cannot write: {e}"),
            },
            _ => {}
        }
    }
    if let Some(n) = arg_value(&args, "--primes") {
        println!("{} primes below {n}", count_primes(n));
    }
    if has("--spin") {
        let mut x: u64 = 0;
        loop {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }
    let interval = Duration::from_millis(arg_value(&args, "--interval-ms").unwrap_or(1000));
    let ticks = if has("--forever") { u64::MAX } else { arg_value(&args, "--ticks").unwrap_or(0) };
    for i in 1..=ticks {
        println!("tick {i}");
        std::thread::sleep(interval);
    }
    if let Some(ms) = arg_value(&args, "--sleep-ms") {
        std::thread::sleep(Duration::from_millis(ms));
    }
    if has("--trap") {
        eprintln!("about to trap");
        #[cfg(target_family = "wasm")]
        core::arch::wasm32::unreachable();
    }
    if let Some(code) = arg_value(&args, "--exit") {
        eprintln!("exiting with code {code}");
        std::process::exit(code as i32);
    }
}
