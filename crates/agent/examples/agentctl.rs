//! Talk to a vmfactory guest agent from the host:
//! `cargo run -p vmfactory-agent --example agentctl -- URL COMMAND [ARG]`.
//!
//! Commands: check, version, details, resources, random N, time, uptime, reseed, settime,
//! online N, loop N (check N times, reconnecting each time).

use std::time::{Duration, Instant, SystemTime};

use vmfactory_agent::{Agent, KataAgent};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(url), Some(cmd)) = (args.first(), args.get(1)) else {
        eprintln!("usage: agentctl URL COMMAND [ARG]");
        std::process::exit(2);
    };
    let arg: u32 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(16);
    let secs = std::env::var("AGENTCTL_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let agent = KataAgent::new(url.as_str(), Duration::from_secs(secs))?;
    let start = Instant::now();
    match cmd.as_str() {
        "check" => println!("{:?}", agent.check().await?),
        "version" => println!("{:?}", agent.version().await?),
        "details" => println!("{:?}", agent.get_guest_details().await?),
        "resources" => println!("{:?}", agent.resources().await?),
        "random" => println!("{:02x?}", agent.random(arg).await?),
        "time" => println!("{:?}", agent.guest_time().await?),
        "uptime" => println!("{:?}", agent.uptime().await?),
        "reseed" => agent.reseed_random_dev(&[0x5a; 64]).await?,
        "settime" => agent.set_guest_date_time(SystemTime::now()).await?,
        "online" => agent.online_cpu_mem(true, arg, false).await?,
        "loop" => {
            for i in 0..arg {
                let t = Instant::now();
                let s = agent.check().await?;
                agent.disconnect().await?;
                println!("{i}: {s:?} in {:?}", t.elapsed());
            }
        }
        other => return Err(format!("unknown command {other}").into()),
    }
    eprintln!("done in {:?}", start.elapsed());
    Ok(())
}
