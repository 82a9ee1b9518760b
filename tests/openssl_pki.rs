//! Certificates from another CA tool: a root, an intermediate, broker and appliance
//! leaves made with the `openssl` command line (P-256 and Ed25519 appliance keys, SEC1
//! and PKCS#8 key files). The real broker and the real agent work with them unchanged.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed (Debian's openssl package)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// Issue `name` (key already in `<name>.key`) from `ca` with the given extensions.
fn issue(dir: &Path, name: &str, ca: &str, ext: &str) {
    write(dir, &format!("{name}.ext"), ext);
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-subj",
            &format!("/CN={name}"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "30",
            "-sha256",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

fn fingerprint(dir: &Path, pem: &str) -> String {
    let text = std::fs::read(dir.join(pem)).unwrap();
    let der = rustls_pemfile::certs(&mut text.as_slice())
        .next()
        .unwrap()
        .unwrap();
    tether::pki::fingerprint_hex(&der)
}

#[tokio::test]
async fn openssl_issued_certificates_work_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Root and intermediate (P-256).
    openssl(
        d,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "root.key",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "root.key",
            "-subj",
            "/CN=OpenSSL Root",
            "-days",
            "3650",
            "-sha256",
            "-out",
            "root.pem",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    openssl(
        d,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "inter.key",
        ],
    );
    issue(
        d,
        "inter",
        "root",
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n",
    );
    // Broker leaf: serverAuth, SAN URI for the broker plus localhost.
    openssl(
        d,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "broker.key",
        ],
    );
    issue(
        d,
        "broker",
        "inter",
        &format!("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=URI:spiffe://{TRUST_DOMAIN}/broker/ossl,DNS:localhost,IP:127.0.0.1\n"),
    );
    // Appliances: one P-256 (SEC1 key file), one Ed25519 (PKCS#8).
    openssl(
        d,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "app-ec.key",
        ],
    );
    openssl(
        d,
        &["genpkey", "-algorithm", "ed25519", "-out", "app-ed.key"],
    );
    for id in ["app-ec", "app-ed"] {
        issue(
            d,
            id,
            "inter",
            &format!("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\nsubjectAltName=URI:spiffe://{TRUST_DOMAIN}/appliance/{id}\n"),
        );
    }
    let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    write(d, "ca.pem", &(read("root.pem") + &read("inter.pem")));
    write(
        d,
        "broker-chain.pem",
        &(read("broker.pem") + &read("inter.pem")),
    );
    write(
        d,
        "allowlist.txt",
        &format!(
            "app-ec {}\napp-ed {}\n",
            fingerprint(d, "app-ec.pem"),
            fingerprint(d, "app-ed.pem")
        ),
    );
    write(
        d,
        "broker.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ntrust_domain = \"{TRUST_DOMAIN}\"\n\
             [tls]\nca = \"ca.pem\"\ncert = \"broker-chain.pem\"\nkey = \"broker.key\"\n\
             [allowlist]\nfile = \"allowlist.txt\"\n"
        ),
    );
    let broker = BrokerProc::start(&d.join("broker.toml"));

    let mut agents = Vec::new();
    for id in ["app-ec", "app-ed"] {
        let state = d.join(format!("state-{id}"));
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join("client.key.pem"), read(&format!("{id}.key"))).unwrap();
        std::fs::write(
            state.join("client.cert.pem"),
            read(&format!("{id}.pem")) + &read("inter.pem"),
        )
        .unwrap();
        std::fs::write(state.join("ca.cert.pem"), read("root.pem")).unwrap();
        agents.push(AgentProc::start(&state, &[broker.quic], &[]));
    }
    for id in ["app-ec", "app-ed"] {
        let row = broker.wait_session(id).await;
        assert_eq!(row["fingerprint"], fingerprint(d, &format!("{id}.pem")));
        let (status, lines) =
            run_command(&broker, id, serde_json::json!({"argv": ["echo", id]})).await;
        assert_eq!(status, 200);
        assert_eq!(lines[0]["data"], format!("{id}\n"));
    }
}
