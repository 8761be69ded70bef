//! imagebuilder against the real control plane: a bootstrap token created at build time with an
//! API key (`[token_from_server]`).

use kernex_tests::{binary, Server};
use std::process::Command;

#[test]
fn imagebuilder_fetches_a_fresh_token_with_an_api_key() {
    let server = Server::start();
    let api = server.tenant("acme");
    let dir = tempfile::tempdir().unwrap();
    let tenants = dir.path().join("tenants");
    std::fs::create_dir(&tenants).unwrap();
    std::fs::write(
        tenants.join("acme.toml"),
        format!(
            "server_url = \"{}\"\n[token_from_server]\napi_key_file = \"acme.apikey\"\nuses = 5\nttl = \"7d\"\n",
            server.url
        ),
    )
    .unwrap();
    let render = |key: &str| {
        std::fs::write(tenants.join("acme.apikey"), format!("{key}\n")).unwrap();
        let out_dir = dir.path().join(format!("seed-{}", &key[..8]));
        Command::new(binary("imagebuilder"))
            .args(["render", "--tenant", "acme", "--tenants-dir"])
            .arg(&tenants)
            .arg("--out")
            .arg(&out_dir)
            .output()
            .map(|out| (out, out_dir))
            .unwrap()
    };

    let (out, seed) = render(&api.key);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bootstrap = std::fs::read_to_string(seed.join("bootstrap.toml")).unwrap();
    let (_, tokens) = api.get("/tokens");
    let token = &tokens.as_array().unwrap()[0];
    assert_eq!(token["description"], "imagebuilder: tenant acme");
    assert_eq!(token["uses_allowed"], 5);
    assert!(
        bootstrap.contains(&format!("token = \"kxb_{}_", token["id"].as_str().unwrap())),
        "{bootstrap}"
    );

    // A viewer key may not create tokens: the error says so and names the URL.
    let (_, viewer) = api.post("/apikeys", serde_json::json!({"role": "viewer"}));
    let (out, _) = render(viewer["key"].as_str().unwrap());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("POST {}/api/v1/tokens: HTTP 403", server.url))
            && stderr.contains("forbidden"),
        "{stderr}"
    );
}
