//! `scripts/demo` as a new user runs it: every command it prints answers with a token.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// A plain test, not an async one: everything here waits on processes and pipes, and none of
/// it may block a runtime.
#[test]
fn every_command_the_demo_prints_returns_a_token() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let state = tempfile::tempdir().unwrap();
    let mut demo = Command::new("bash")
        .arg(root.join("scripts/demo"))
        .current_dir(root)
        // Any free port: the commands it prints must carry the one it got.
        .env("PORT", "0")
        .env("DEMO_DIR", state.path().join("demo"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("bash runs scripts/demo");
    let stdout = demo.stdout.take().unwrap();
    let (lines, printed) = std::sync::mpsc::channel();
    // Read to the end, so that the broker's log never fills the pipe.
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut output = Vec::new();
    let mut commands = Vec::new();
    // The demo builds first (a no-op after `scripts/test`'s build, minutes on a cold machine).
    loop {
        let line = printed
            .recv_timeout(Duration::from_secs(600))
            .unwrap_or_else(|_| panic!("the demo printed no commands:\n{}", output.join("\n")));
        if line.trim_start().starts_with("curl ") {
            commands.push(line.trim().to_string());
        } else if !commands.is_empty() && line.trim().is_empty() {
            break;
        }
        output.push(line);
    }
    assert_eq!(commands.len(), 2, "{commands:?}");

    for command in &commands {
        let run = Command::new("sh").args(["-c", command]).output().unwrap();
        let body = String::from_utf8_lossy(&run.stdout);
        assert!(run.status.success(), "{command}: {body}");
        let token: Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("{command}: not JSON: {body}"));
        assert!(
            token["access_token"]
                .as_str()
                .is_some_and(|t| !t.is_empty()),
            "{command}: {token}"
        );
        assert_eq!(token["token_type"], "Bearer", "{command}");
        assert!(
            token["expires_in"]
                .as_u64()
                .is_some_and(|expires_in| expires_in > 0),
            "{command}: {token}"
        );
        if command.contains("scope=") {
            assert_eq!(token["scope"], "read write", "{command}");
        }
    }

    // Stopping the demo stops everything it started: its output ends (the broker writes to it).
    Command::new("kill")
        .args(["-TERM", &demo.id().to_string()])
        .status()
        .unwrap();
    let ended = loop {
        match printed.recv_timeout(Duration::from_secs(30)) {
            Ok(_) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break true,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break false,
        }
    };
    assert!(ended, "something the demo started still holds its output");
    reader.join().unwrap();
    assert!(demo.wait().is_ok());
}
