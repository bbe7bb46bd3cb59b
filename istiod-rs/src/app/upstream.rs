//! Starting from upstream istiod's Deployment unchanged: its command line
//! (`pilot-discovery discovery --monitoringAddr=:15014
//! --log_output_level=default:info --domain cluster.local
//! --keepaliveMaxServerConnectionAge 30m`, from istio/istio
//! `manifests/charts/istio-control/istio-discovery/templates/deployment.yaml`)
//! becomes ours. The environment variables that Deployment sets and
//! istiod-rs shares (`CLUSTER_ID`, `POD_NAMESPACE`,
//! `PILOT_AUTO_ALLOW_WAYPOINT_POLICY`, ...) already have upstream's names.
//! README's "Upstream names" table is the user-facing list.

use std::ffi::OsString;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UpstreamArgError {
    #[error("{flag} needs a value, as upstream istiod's flag does")]
    MissingValue { flag: String },
    #[error("{flag}={value:?}: {reason}")]
    Invalid {
        flag: String,
        value: String,
        reason: String,
    },
}

/// What the translation did not apply, for the log once it is set up.
pub type Notes = Vec<String>;

/// Turns an upstream flag's value into ours, or says why it cannot.
type Convert = fn(&str) -> Result<String, String>;

/// Upstream flag -> our flag, with a value conversion.
const FLAGS: &[(&str, &str, Convert)] = &[
    ("--monitoringAddr", "--monitoring-addr", listen_address),
    ("--secureGRPCAddr", "--grpc-addr", listen_address),
    ("--grpcAddr", "--plaintext-addr", listen_address),
    ("--httpsAddr", "--webhook-addr", listen_address),
    ("--httpAddr", "--http-addr", listen_address),
    ("--domain", "--cluster-domain", same),
    ("--log_output_level", "--log-level", log_level),
];

/// Upstream flags istiod-rs accepts without applying (named in `Notes`).
const NOT_APPLIED: &[(&str, &str)] = &[(
    "--keepaliveMaxServerConnectionAge",
    "istiod-rs does not age out xDS connections; proxies keep theirs until they or a drain close them",
)];

fn same(value: &str) -> Result<String, String> {
    Ok(value.to_string())
}

/// Go's `:15014` (every address) as an address we can bind.
fn listen_address(value: &str) -> Result<String, String> {
    let value = match value.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => value.to_string(),
    };
    value
        .parse::<std::net::SocketAddr>()
        .map(|a| a.to_string())
        .map_err(|e| format!("not host:port or :port ({e})"))
}

/// Upstream's `scope:level,scope:level` (levels none, error, warn, info,
/// debug): the `default` scope's level is ours; other scopes are upstream's
/// package names, which mean nothing here.
fn log_level(value: &str) -> Result<String, String> {
    let default = value
        .split(',')
        .filter_map(|part| part.split_once(':'))
        .find(|(scope, _)| scope.trim() == "default")
        .map(|(_, level)| level.trim())
        .ok_or("no level for the `default` scope")?;
    match default {
        "none" => Ok("off".into()),
        "error" | "warn" | "info" | "debug" => Ok(default.into()),
        other => Err(format!("unknown level {other:?}")),
    }
}

/// Our command line for `argv` as upstream's Deployment runs it: the
/// `discovery` command word is dropped, upstream's flags become ours, and
/// `--log_as_json` becomes `--log-as-json`. Anything else is left for our
/// parser, which rejects what it does not know.
pub fn discovery_argv(argv: Vec<OsString>) -> Result<(Vec<OsString>, Notes), UpstreamArgError> {
    let mut out = Vec::with_capacity(argv.len());
    let mut notes = Notes::new();
    let mut args = argv.into_iter();
    out.extend(args.next());
    let mut args = args.peekable();
    if args.peek().is_some_and(|a| a == "discovery") {
        args.next();
    }
    while let Some(arg) = args.next() {
        let Some(text) = arg.to_str().map(str::to_string) else {
            out.push(arg);
            continue;
        };
        let (name, inline) = match text.split_once('=') {
            Some((name, value)) => (name.to_string(), Some(value.to_string())),
            None => (text.clone(), None),
        };
        if name == "--log_as_json" {
            out.push("--log-as-json".into());
            continue;
        }
        let mapped = FLAGS.iter().find(|(upstream, ..)| *upstream == name);
        let ignored = NOT_APPLIED.iter().find(|(upstream, _)| *upstream == name);
        if mapped.is_none() && ignored.is_none() {
            out.push(arg);
            continue;
        }
        let value = match inline {
            Some(value) => value,
            None => args
                .next()
                .and_then(|v| v.into_string().ok())
                .ok_or_else(|| UpstreamArgError::MissingValue { flag: name.clone() })?,
        };
        if let Some((_, why)) = ignored {
            notes.push(format!("{name} {value}: accepted, not applied: {why}"));
            continue;
        }
        let (_, ours, convert) = mapped.expect("a mapped flag");
        let converted = convert(&value).map_err(|reason| UpstreamArgError::Invalid {
            flag: name.clone(),
            value: value.clone(),
            reason,
        })?;
        out.push(format!("{ours}={converted}").into());
    }
    Ok((out, notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(argv: &[&str]) -> Result<(Vec<String>, Notes), UpstreamArgError> {
        discovery_argv(argv.iter().map(OsString::from).collect()).map(|(argv, notes)| {
            let argv = argv.into_iter().map(|a| a.into_string().unwrap()).collect();
            (argv, notes)
        })
    }

    #[test]
    fn the_upstream_deployments_command_line_becomes_ours() {
        let (argv, notes) = run(&[
            "istiod-rs",
            "discovery",
            "--monitoringAddr=:15014",
            "--log_output_level=default:info,ads:debug",
            "--log_as_json",
            "--domain",
            "cluster.local",
            "--trust-domain=example.org",
            "--keepaliveMaxServerConnectionAge",
            "30m",
        ])
        .unwrap();
        assert_eq!(
            argv,
            [
                "istiod-rs",
                "--monitoring-addr=0.0.0.0:15014",
                "--log-level=info",
                "--log-as-json",
                "--cluster-domain=cluster.local",
                "--trust-domain=example.org",
            ]
        );
        assert_eq!(notes.len(), 1);
        assert!(notes[0].starts_with("--keepaliveMaxServerConnectionAge 30m"));
        // Our own command line is left alone.
        let ours = ["istiod-rs", "--config-dir", "/x", "--grpc-addr=0.0.0.0:1"];
        assert_eq!(run(&ours).unwrap().0, ours);
    }

    #[test]
    fn bad_upstream_values_are_named() {
        assert_eq!(
            run(&["istiod-rs", "--domain"]).unwrap_err(),
            UpstreamArgError::MissingValue {
                flag: "--domain".into()
            }
        );
        let err = run(&["istiod-rs", "--monitoringAddr=nowhere"]).unwrap_err();
        assert!(
            matches!(&err, UpstreamArgError::Invalid { flag, .. } if flag == "--monitoringAddr"),
            "{err}"
        );
        let err = run(&["istiod-rs", "--log_output_level=ads:debug"]).unwrap_err();
        assert!(err.to_string().contains("default"), "{err}");
        assert_eq!(
            run(&["istiod-rs", "--log_output_level=default:none"])
                .unwrap()
                .0[1],
            "--log-level=off"
        );
    }
}
