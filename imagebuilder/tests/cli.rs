//! imagebuilder as users run it: the real binary, real xorriso, a small ISO with Ubuntu's file layout
//! made here, and the static agent (`just agent-binary` builds it; `KERNEX_AGENT_BIN` overrides).
//! Golden files for the example tenant's seed: `KERNEX_UPDATE_GOLDEN=1` rewrites them.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn agent() -> PathBuf {
    let path = std::env::var_os("KERNEX_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/x86_64-unknown-linux-musl/agent/kernex-agent"));
    assert!(
        path.is_file(),
        "{} missing: build the static agent with `just agent-binary`",
        path.display()
    );
    path
}

fn imagebuilder(args: &[&str]) -> Output {
    // Never the user's cache: tests that care pass --cache-dir; the others get a throw-away one.
    let scratch = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_imagebuilder"))
        .args(args)
        .current_dir(workspace())
        .env("KERNEX_AGENT_BIN", agent())
        .env("KERNEX_IMAGEBUILDER_CACHE", scratch.path())
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_owned()
}

/// An ISO with the files of Ubuntu's live-server layout (no boot records: those are the QEMU test's).
fn layout_iso(dir: &Path) -> PathBuf {
    let src = dir.join("iso-src");
    for (path, text) in [
        ("casper/vmlinuz", "kernel"),
        ("casper/initrd", "initrd"),
        (".disk/info", "Ubuntu-Server 24.04.1 LTS \"Noble Numbat\" - Release amd64"),
        ("EFI/boot/bootx64.efi", "efi"),
        ("md5sum.txt", "0  ./casper/vmlinuz\n"),
        (
            "boot/grub/grub.cfg",
            "set timeout=30\nmenuentry \"Try or Install Ubuntu Server\" {\n\tlinux\t/casper/vmlinuz  ---\n\tinitrd\t/casper/initrd\n}\n",
        ),
    ] {
        let p = src.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    let iso = dir.join("base.iso");
    let out = Command::new("xorriso")
        .args([
            "-as",
            "mkisofs",
            "-quiet",
            "-r",
            "-J",
            "-V",
            "Ubuntu-Server 24.04.1 LTS amd64",
            "-o",
        ])
        .arg(&iso)
        .arg(&src)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    iso
}

fn tenant_dir(dir: &Path, token: &str) -> PathBuf {
    let tenants = dir.join("tenants");
    std::fs::create_dir_all(&tenants).unwrap();
    std::fs::write(
        tenants.join("acme.toml"),
        "server_url = \"http://10.0.2.2:8080\"\ntoken_file = \"acme.token\"\n",
    )
    .unwrap();
    std::fs::write(tenants.join("acme.token"), format!("{token}\n")).unwrap();
    tenants
}

const TOKEN: &str =
    "kxb_00112233445566ff_aa00000000000000000000000000000000000000000000000000000000000000";

#[test]
fn builds_are_private_recorded_reproducible_and_inspectable() {
    let dir = tempfile::tempdir().unwrap();
    let base = layout_iso(dir.path());
    let tenants = tenant_dir(dir.path(), TOKEN);
    let cache = dir.path().join("cache");
    let mut digests = Vec::new();
    // a: prepares and caches; b: reuses the prepared ISO; c: no cache at all. Same bytes each time.
    for (run, cache_args, reused) in [
        ("a", vec!["--cache-dir", cache.to_str().unwrap()], false),
        ("b", vec!["--cache-dir", cache.to_str().unwrap()], true),
        ("c", vec!["--no-cache"], false),
    ] {
        let out_dir = dir.path().join(run);
        std::fs::create_dir(&out_dir).unwrap();
        let mut args = vec![
            "build",
            "--tenant",
            "acme",
            "--base",
            base.to_str().unwrap(),
            "--tenants-dir",
            tenants.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
            "--json",
        ];
        args.extend(cache_args);
        let out = imagebuilder(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(record["prepared"]["reused"], reused, "run {run}");
        let iso = out_dir.join("acme.iso");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&iso).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let independent = Command::new("sha256sum").arg(&iso).output().unwrap();
        let independent = String::from_utf8_lossy(&independent.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned();
        assert_eq!(
            record["iso_sha256"].as_str(),
            Some(independent.as_str()),
            "the recorded checksum is the file's"
        );
        let sha = std::fs::read_to_string(out_dir.join("acme.iso.sha256")).unwrap();
        assert_eq!(
            sha,
            format!("{}  acme.iso\n", record["iso_sha256"].as_str().unwrap())
        );
        assert_eq!(record["token_id"], "00112233445566ff");
        let on_disk = std::fs::read_to_string(out_dir.join("acme.build.json")).unwrap();
        assert!(
            !on_disk.contains(&TOKEN[21..]),
            "the build record must not contain the token"
        );
        assert_eq!(
            record["inputs"]["agent"]["sha256"].as_str().unwrap().len(),
            64
        );
        let leftovers: Vec<_> = std::fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            leftovers.len(),
            3,
            "only the ISO, its checksum and the record: {leftovers:?}"
        );
        digests.push(record["iso_sha256"].as_str().unwrap().to_owned());

        // What the installer reads: the seed, and an md5sum.txt that still matches every file.
        let check = out_dir.join("check");
        let out = Command::new("xorriso")
            .args(["-osirrox", "on", "-indev"])
            .arg(&iso)
            .args(["-extract", "/", check.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let user_data = std::fs::read_to_string(check.join("nocloud/user-data")).unwrap();
        assert!(
            user_data.starts_with("#cloud-config\n") && user_data.contains("kernex-agent.service")
        );
        let out = Command::new("md5sum")
            .args(["--quiet", "-c", "md5sum.txt"])
            .current_dir(&check)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "md5sum.txt: {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
        let bootstrap = std::fs::read_to_string(check.join("kernex/bootstrap.toml")).unwrap();
        assert!(
            bootstrap.contains(TOKEN)
                && bootstrap.contains("server_url = \"http://10.0.2.2:8080\"")
        );

        let out = imagebuilder(&["inspect", iso.to_str().unwrap(), "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let inspected: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (inspected["tenant"].as_str(), inspected["token_id"].as_str()),
            (Some("acme"), Some("00112233445566ff"))
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains(&TOKEN[21..]));
    }
    assert_eq!(
        digests[0], digests[1],
        "same inputs must give the same bytes"
    );
}

#[test]
fn bad_input_is_refused_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let base = layout_iso(dir.path());
    let tenants = tenant_dir(dir.path(), TOKEN);
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let build = |base: &str, extra: &[&str]| {
        let mut args = vec![
            "build",
            "--tenant",
            "acme",
            "--base",
            base,
            "--tenants-dir",
            tenants.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        imagebuilder(&args)
    };

    let not_iso = dir.path().join("tenants/acme.toml");
    let out = build(not_iso.to_str().unwrap(), &[]);
    assert!(
        stderr(&out)
            .contains("acme.toml is not an Ubuntu live-server ISO: missing /casper/vmlinuz"),
        "{}",
        stderr(&out)
    );
    let out = build(dir.path().join("missing.iso").to_str().unwrap(), &[]);
    assert!(
        stderr(&out).ends_with("missing.iso: no such file"),
        "{}",
        stderr(&out)
    );
    let out = build(base.to_str().unwrap(), &["--agent", "/bin/ls"]);
    assert_eq!(
        stderr(&out),
        "error: agent binary /bin/ls is dynamically linked; build the static one with `just agent`"
    );
    std::fs::write(tenants.join("acme.token"), "kxb_oops\n").unwrap();
    let out = build(base.to_str().unwrap(), &[]);
    let message = stderr(&out);
    assert!(
        message.contains(&format!(
            "token_file {}",
            tenants.join("acme.token").display()
        )) && !message.contains("oops"),
        "{message}"
    );
    assert_eq!(
        std::fs::read_dir(&out_dir).unwrap().count(),
        0,
        "failed builds leave nothing"
    );

    std::fs::write(tenants.join("acme.token"), format!("{TOKEN}\n")).unwrap();
    assert!(build(base.to_str().unwrap(), &[]).status.success());
    let before = std::fs::read(out_dir.join("acme.iso")).unwrap();
    let out = build(base.to_str().unwrap(), &[]);
    assert_eq!(
        stderr(&out),
        format!(
            "error: {} already exists; pass --force to replace it",
            out_dir.join("acme.iso").display()
        )
    );
    assert_eq!(std::fs::read(out_dir.join("acme.iso")).unwrap(), before);
    assert!(build(base.to_str().unwrap(), &["--force"]).status.success());

    let out = imagebuilder(&[
        "build",
        "--tenant",
        "nobody",
        "--base",
        base.to_str().unwrap(),
        "--tenants-dir",
        tenants.to_str().unwrap(),
    ]);
    assert!(stderr(&out).starts_with(&format!(
        "error: reading tenant config {}",
        tenants.join("nobody.toml").display()
    )));
}

#[test]
fn the_example_tenant_renders_to_the_golden_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = imagebuilder(&[
        "render",
        "--tenant",
        "example",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let golden = workspace().join("imagebuilder/tests/golden/example");
    for name in ["user-data", "meta-data", "bootstrap.toml"] {
        let rendered = std::fs::read_to_string(dir.path().join(name)).unwrap();
        if std::env::var_os("KERNEX_UPDATE_GOLDEN").is_some() {
            std::fs::write(golden.join(name), &rendered).unwrap();
        }
        let expected = std::fs::read_to_string(golden.join(name))
            .unwrap_or_else(|_| panic!("no golden {name}: run with KERNEX_UPDATE_GOLDEN=1"));
        assert_eq!(
            rendered, expected,
            "{name} differs from its golden file (KERNEX_UPDATE_GOLDEN=1 to accept)"
        );
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("bootstrap.toml"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let again = imagebuilder(&[
        "render",
        "--tenant",
        "example",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(
        stderr(&again).ends_with("already exists; pass --force to replace it"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn a_full_disk_fails_cleanly() {
    // RLIMIT_FSIZE stands in for a full disk without root: writes past 1 MiB fail (EFBIG, with
    // SIGXFSZ ignored) exactly where ENOSPC would, after the cache is warm so the copy is what fails.
    let dir = tempfile::tempdir().unwrap();
    let base = layout_iso(dir.path());
    let tenants = tenant_dir(dir.path(), TOKEN);
    let (cache, out_dir) = (dir.path().join("cache"), dir.path().join("out"));
    std::fs::create_dir(&out_dir).unwrap();
    let agent = agent();
    let args = [
        "build",
        "--tenant",
        "acme",
        "--base",
        base.to_str().unwrap(),
        "--tenants-dir",
        tenants.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--agent",
        agent.to_str().unwrap(),
    ];
    let warm = imagebuilder(&args);
    assert!(warm.status.success(), "{}", stderr(&warm));
    for entry in std::fs::read_dir(&out_dir).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let out = Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 1024; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_imagebuilder"))
        .args(args)
        .current_dir(workspace())
        .output()
        .unwrap();
    let message = stderr(&out);
    assert!(!out.status.success());
    assert!(
        message.contains("copying") && message.contains("File too large"),
        "{message}"
    );
    assert_eq!(
        std::fs::read_dir(&out_dir).unwrap().count(),
        0,
        "nothing left behind"
    );
}
