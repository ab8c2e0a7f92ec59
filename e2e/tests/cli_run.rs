//! `vmfactory run` and `vmfactory exec` on real QEMU: exit codes (42, 137), `-t` without a
//! local terminal, 8 concurrent `run`s on one template each seeing only its own `--copy`
//! file; a VM held by `get --hold` serving both `vmfactory exec` and an outside ttRPC client
//! (the holder keeps no agent session). Nothing may leak.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use vmfactory_agent::{Agent, HealthStatus, KataAgent};
use vmfactory_e2e::cli::{ok, run, Setup};
use vmfactory_e2e::scaled;
use vmfactory_vm::{ExitStatus, Process, ProcessSpec};

fn code(o: &std::process::Output) -> Option<i32> {
    o.status.code()
}

#[test]
fn run_exit_codes_tty_and_eight_at_once_on_one_template() {
    let Some(s) = Setup::new(0) else { return };
    let (bin, cfg) = (&s.bin, &s.cfg);
    ok(&run(bin, cfg, &["init"]), "init");

    let o = run(
        bin,
        cfg,
        &["run", "--", "sh", "-c", "echo out; echo err >&2; exit 42"],
    );
    assert_eq!(code(&o), Some(42), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("err\n"),
        "{o:?}"
    );
    let o = run(bin, cfg, &["run", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(code(&o), Some(137), "{o:?}");
    let o = run(bin, cfg, &["run", "-t", "--", "stty", "size"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "24 80", "{o:?}");
    let o = run(
        bin,
        cfg,
        &[
            "run",
            "-e",
            "A=1",
            "-w",
            "/tmp",
            "-u",
            "1000:1000",
            "--",
            "sh",
            "-c",
            "echo $A $(pwd) $(id -u)",
        ],
    );
    assert_eq!(ok(&o, "run -e -w -u"), "1 /tmp 1000\n");
    // Bad input: one line, exit 2, nothing started.
    let o = run(
        bin,
        cfg,
        &["run", "--copy", "/nonexistent/file:/x", "--", "true"],
    );
    assert_eq!(code(&o), Some(2), "{o:?}");
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).lines().count(),
        1,
        "{o:?}"
    );

    // 8 at once, each with its own file.
    let runs: Vec<_> = (0..8)
        .map(|i| {
            let file = s.scratch.path().join(format!("secret-{i}"));
            std::fs::write(&file, format!("secret {i}\n")).expect("file");
            let copy = format!("{}:/tmp/mine", file.display());
            Command::new(bin)
                .arg("--config")
                .arg(cfg)
                .args([
                    "run",
                    "--copy",
                    &copy,
                    "--",
                    "sh",
                    "-c",
                    "cat /tmp/mine; ls /tmp",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn run")
        })
        .collect();
    for (i, child) in runs.into_iter().enumerate() {
        let o = child.wait_with_output().expect("run");
        assert_eq!(ok(&o, "concurrent run"), format!("secret {i}\nmine\n"));
    }
    ok(&run(bin, cfg, &["destroy"]), "destroy");
    s.root.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_vm_serves_exec_and_an_outside_client() {
    let Some(s) = Setup::new(0) else { return };
    let (bin, cfg) = (s.bin.clone(), s.cfg.clone());
    ok(&run(&bin, &cfg, &["init"]), "init");
    let mut holder = Command::new(&bin)
        .arg("--config")
        .arg(&cfg)
        .args(["get", "--hold"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn get --hold");
    // `get` prints its JSON, then holds.
    let mut json = String::new();
    let mut lines = BufReader::new(holder.stdout.take().expect("stdout"));
    while !json.ends_with("}\n") {
        assert!(
            lines.read_line(&mut json).expect("read") > 0,
            "get ended: {json}"
        );
    }
    let got: serde_json::Value = serde_json::from_str(&json).expect("get JSON");
    let id = got["id"].as_str().expect("id").to_owned();
    let url = got["agent_url"].as_str().expect("agent_url").to_owned();

    // An outside ttRPC client on the printed URL.
    let agent = KataAgent::new(url.as_str(), scaled(Duration::from_secs(10))).expect("url");
    assert_eq!(agent.check().await.expect("check"), HealthStatus::Serving);
    let agent: Arc<dyn Agent> = Arc::new(agent);
    let mut p = Process::start(&id, agent.clone(), ProcessSpec::new(["echo", "outside"]))
        .await
        .expect("exec");
    let mut out = String::new();
    p.stdout()
        .expect("stdout")
        .read_to_string(&mut out)
        .await
        .expect("read");
    assert_eq!(out, "outside\n");
    assert_eq!(p.wait().await.expect("wait"), ExitStatus::Code(0));
    agent.disconnect().await.expect("disconnect");

    // `vmfactory exec` on the same VM.
    let o = tokio::task::spawn_blocking(move || {
        run(
            &bin,
            &cfg,
            &["exec", &id, "--", "sh", "-c", "echo inside; exit 3"],
        )
    })
    .await
    .expect("exec");
    assert_eq!(code(&o), Some(3), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "inside\n");

    let pid = nix::unistd::Pid::from_raw(holder.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::SIGTERM).expect("SIGTERM");
    assert!(holder.wait().expect("holder").success());
    ok(&run(&s.bin, &s.cfg, &["destroy"]), "destroy");
    s.root.assert_no_leaks();
}

/// `run --net`: the guest fetches from a server on the host at 10.0.2.2; `run -p`: the host
/// reaches a server in the guest through the published port, which is gone after the run.
#[test]
fn run_net_fetches_from_the_host_and_publish_serves_it() {
    use std::io::{Read, Write};
    let Some(s) = Setup::new(0) else { return };
    let (bin, cfg) = (&s.bin, &s.cfg);
    let server = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = server.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut c in server.incoming().flatten() {
            let mut req = [0u8; 1024];
            let _ = c.read(&mut req);
            let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 11\r\n\r\nfrom host\r\n");
        }
    });
    let o = run(
        bin,
        cfg,
        &[
            "run",
            "--net",
            "--",
            "sh",
            "-c",
            &format!("wget -q -O - http://10.0.2.2:{port}/"),
        ],
    );
    assert_eq!(ok(&o, "run --net"), "from host\r\n");

    // A free port, then published.
    let published = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("probe")
        .local_addr()
        .expect("addr")
        .port();
    let mapping = format!("127.0.0.1:{published}:80");
    let mut child = Command::new(bin)
        .args(["--config"])
        .arg(cfg)
        .args(["run", "-p", &mapping, "--", "sh", "-c"])
        .arg("mkdir /w && echo in guest > /w/index.html && httpd -p 80 -h /w && echo ready && sleep 120")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run -p");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("ready"));
    let mut body = String::new();
    let mut c = std::net::TcpStream::connect(("127.0.0.1", published)).expect("published port");
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("request");
    c.read_to_string(&mut body).expect("response");
    assert!(body.ends_with("in guest\n"), "{body}");
    // A second run cannot take the same port: one line, exit 2, no VM.
    let taken = run(bin, cfg, &["run", "-p", &mapping, "--", "true"]);
    assert_eq!(code(&taken), Some(2), "{taken:?}");
    assert!(String::from_utf8_lossy(&taken.stderr).contains(&format!("--publish {mapping}")));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let st = child.wait().expect("wait");
    assert!(!st.success(), "{st:?}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", published)).is_err(),
        "still published"
    );
    s.root.assert_no_leaks();
}
