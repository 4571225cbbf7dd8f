//! `scripts/smoke-test` against a stand-in for the deployed app: it never puts the function key
//! (or a caller token) on a command line, says what a bodiless 401 means instead of printing a
//! traceback, retries while a role assignment propagates, and never prints the token.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::root;

const KEY: &str = "k3y-Abc123/+=-function-key-value-0123456789";
const CALLER_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.caller.token";
const ACCESS_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.issued.access-token";

/// Answers one connection per canned response and returns the requests' head lines; stops
/// waiting for the next connection after 20 s, so a script that asks less often fails the test
/// instead of hanging it.
fn serve(responses: Vec<String>) -> (String, JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let mut requests = Vec::new();
        for response in responses {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut stream = loop {
                match listener.accept() {
                    Ok((stream, _)) => break stream,
                    Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => return requests,
                }
            };
            stream.set_nonblocking(false).unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            stream.write_all(response.as_bytes()).unwrap();
            requests.push(head);
        }
        requests
    });
    (url, handle)
}

fn answer(status: &str, body: &str) -> String {
    let content_type = if body.is_empty() {
        String::new()
    } else {
        "Content-Type: application/json\r\n".to_string()
    };
    format!(
        "HTTP/1.1 {status}\r\n{content_type}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn token_answer() -> String {
    answer(
        "200 OK",
        &format!(
            r#"{{"access_token":"{ACCESS_TOKEN}","token_type":"Bearer","expires_in":3599,"expires_on":1795846471,"scope":"read"}}"#
        ),
    )
}

/// A `curl` first on PATH that logs its arguments, then runs the real one.
fn curl_shim(dir: &Path) -> String {
    let real = Command::new("sh")
        .args(["-c", "command -v curl"])
        .output()
        .unwrap();
    let real = String::from_utf8(real.stdout).unwrap().trim().to_string();
    assert!(!real.is_empty(), "curl is needed by scripts/smoke-test");
    let shim = dir.join("curl");
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\" >> \"{}\"; done\nexec {real} \"$@\"\n",
            dir.join("argv.log").display()
        ),
    )
    .unwrap();
    Command::new("chmod")
        .arg("755")
        .arg(&shim)
        .status()
        .unwrap();
    format!("{}:{}", dir.display(), std::env::var("PATH").unwrap())
}

/// Runs the smoke test with `stdin` piped in and extra environment.
fn smoke_test(url: &str, dir: &Path, stdin: &str, env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(root().join("scripts/smoke-test"));
    command
        .arg(url)
        .arg("contoso")
        .env("PATH", curl_shim(dir))
        .env("SMOKE_TEST_RETRY_SECONDS", "0")
        .env("SMOKE_TEST_WAIT_SECONDS", "30")
        .env_remove("TOKEN_BROKER_FUNCTION_KEY")
        .env_remove("TOKEN_BROKER_CALLER_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn smoke_test_reports_a_401_with_an_empty_body_without_a_traceback() {
    let dir = tempfile::tempdir().unwrap();
    let (url, server) = serve(vec![answer("401 Unauthorized", "")]);
    let output = smoke_test(&url, dir.path(), &format!("{KEY}\n"), &[]);
    let said = text(&output);
    server.join().unwrap();
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(!said.contains("Traceback"), "{said}");
    assert!(
        said.contains(
            "FAIL: HTTP 401 with an empty body (the Functions host refused the function key)"
        ),
        "{said}"
    );
}

#[test]
fn smoke_test_never_puts_the_function_key_or_the_caller_token_on_a_command_line() {
    // The key on stdin.
    let dir = tempfile::tempdir().unwrap();
    let (url, server) = serve(vec![token_answer()]);
    let output = smoke_test(&url, dir.path(), &format!("{KEY}\n"), &[]);
    let requests = server.join().unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let argv = std::fs::read_to_string(dir.path().join("argv.log")).unwrap();
    assert!(argv.contains(&url), "the shim saw curl's arguments: {argv}");
    assert!(
        !argv.contains(KEY),
        "the key is on curl's command line: {argv}"
    );
    assert!(
        requests[0].contains(&format!("x-functions-key: {KEY}\r\n")),
        "{requests:?}"
    );
    assert!(requests[0].starts_with("GET /api/token/contoso HTTP/1.1\r\n"));

    // The key and a caller token from the environment.
    let dir = tempfile::tempdir().unwrap();
    let (url, server) = serve(vec![token_answer()]);
    let output = smoke_test(
        &url,
        dir.path(),
        "",
        &[
            ("TOKEN_BROKER_FUNCTION_KEY", KEY),
            ("TOKEN_BROKER_CALLER_TOKEN", CALLER_TOKEN),
        ],
    );
    let requests = server.join().unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let argv = std::fs::read_to_string(dir.path().join("argv.log")).unwrap();
    assert!(
        !argv.contains(KEY) && !argv.contains(CALLER_TOKEN),
        "{argv}"
    );
    assert!(requests[0].contains(&format!("x-functions-key: {KEY}\r\n")));
    assert!(requests[0].contains(&format!("Authorization: Bearer {CALLER_TOKEN}\r\n")));
}

#[test]
fn smoke_test_accepts_a_token_answer_without_printing_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let (url, server) = serve(vec![token_answer()]);
    let output = smoke_test(&format!("{url}/"), dir.path(), KEY, &[]);
    server.join().unwrap();
    let said = text(&output);
    assert!(output.status.success(), "{said}");
    assert!(
        said.contains("OK: Bearer token, expires in 3599 s, scope read"),
        "{said}"
    );
    assert!(
        !said.contains(ACCESS_TOKEN) && !said.contains(KEY),
        "{said}"
    );
}

#[test]
fn smoke_test_retries_while_the_broker_cannot_read_the_secret_and_stops_at_other_errors() {
    let dir = tempfile::tempdir().unwrap();
    let not_yet = answer(
        "503 Service Unavailable",
        r#"{"error":"secret_unavailable","error_description":"connection 'contoso': reading the client secret failed"}"#,
    );
    let (url, server) = serve(vec![not_yet.clone(), not_yet, token_answer()]);
    let output = smoke_test(&url, dir.path(), KEY, &[]);
    assert_eq!(server.join().unwrap().len(), 3);
    let said = text(&output);
    assert!(output.status.success(), "{said}");
    assert!(said.contains("role assignment"), "{said}");

    // Any other refusal is final, and reported from the broker's JSON answer.
    let dir = tempfile::tempdir().unwrap();
    let (url, server) = serve(vec![answer(
        "502 Bad Gateway",
        r#"{"error":"upstream_rejected","error_description":"connection 'contoso': the token endpoint refused the client"}"#,
    )]);
    let output = smoke_test(&url, dir.path(), KEY, &[]);
    assert_eq!(server.join().unwrap().len(), 1);
    let said = text(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(
        said.contains("FAIL: HTTP 502: upstream_rejected:"),
        "{said}"
    );

    // Without a key it refuses to run.
    let dir = tempfile::tempdir().unwrap();
    let output = smoke_test("http://127.0.0.1:9", dir.path(), "", &[]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
}
