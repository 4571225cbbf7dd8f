//! `token-broker-doubles`: runs the managed identity and Key Vault doubles for the local demo.
//!
//! Usage: token-broker-doubles --dir <folder> [--secret name=value]... [--client-id <id>]
//!
//! Prints one JSON line with what the broker needs (`IDENTITY_ENDPOINT`, `IDENTITY_HEADER`,
//! `KEY_VAULT_URI`, `SSL_CERT_FILE`), then serves until SIGTERM or Ctrl-C. Secret values are
//! read from the environment variable named after `=env:` when given as `name=env:VAR`, so a
//! demo secret need not appear in a process listing.

use std::path::PathBuf;

use token_broker_doubles::AzureDoubles;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut dir = None;
    let mut secrets = Vec::new();
    let mut client_id = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--dir" => dir = args.next().map(PathBuf::from),
            "--client-id" => client_id = args.next(),
            "--secret" => {
                let spec = args.next().ok_or("--secret needs name=value")?;
                let (name, value) = spec.split_once('=').ok_or("--secret needs name=value")?;
                let value = match value.strip_prefix("env:") {
                    Some(var) => std::env::var(var).map_err(|_| format!("{var} is not set"))?,
                    None => value.to_string(),
                };
                secrets.push((name.to_string(), value));
            }
            _ => return Err(format!("unknown argument {arg}").into()),
        }
    }
    let dir = dir.ok_or("--dir is required")?;
    std::fs::create_dir_all(&dir)?;
    let doubles = AzureDoubles::start(&dir, client_id).await?;
    for (name, value) in &secrets {
        doubles.vault.set_secret(name, value);
    }
    println!(
        "{}",
        serde_json::json!({
            "IDENTITY_ENDPOINT": doubles.identity.endpoint(),
            "IDENTITY_HEADER": doubles.identity.header(),
            "KEY_VAULT_URI": doubles.vault.uri(),
            "SSL_CERT_FILE": doubles.vault.ca_file(),
        })
    );
    shutdown().await;
    Ok(())
}

async fn shutdown() {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = terminate.recv() => {},
    }
}
