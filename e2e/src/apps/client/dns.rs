//! `client dns`: one query over UDP, read with hickory-proto, and perhaps a
//! connection to the answer; and the stand-in upstream resolver it can run
//! on the pod's loopback meanwhile, so what ztunnel-rs forwards (or looks
//! up for an endpoint known by hostname) stays inside the pod.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query as Question, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;

use crate::apps::DnsReport;

pub struct Query {
    pub name: String,
    /// None: the first nameserver of `resolv_conf`, through its search list.
    pub server: Option<String>,
    pub resolv_conf: std::path::PathBuf,
    pub record_type: String,
    pub upstream: Option<SocketAddr>,
    pub upstream_records: Vec<String>,
    /// Then connect to the first address on this port, the stand-in
    /// resolver still running.
    pub connect_port: Option<u16>,
    pub timeout: Duration,
}

pub async fn run(q: &Query) -> DnsReport {
    let mut report = DnsReport {
        mode: "dns".into(),
        name: q.name.clone(),
        ..DnsReport::default()
    };
    let (server, names) = match destination(q) {
        Ok(d) => d,
        Err(e) => {
            report.error = Some(e);
            return report;
        }
    };
    report.server = server.to_string();
    let asked: Arc<Mutex<Vec<String>>> = Arc::default();
    let upstream = match q.upstream {
        Some(addr) => match serve_upstream(addr, &q.upstream_records, asked.clone()).await {
            Ok(task) => Some(task),
            Err(e) => {
                report.error = Some(format!("stand-in resolver on {addr}: {e}"));
                return report;
            }
        },
        None => None,
    };
    // As a stub resolver: the next name only after NXDOMAIN or no address.
    for name in names {
        match ask(q, server, &name).await {
            Ok(answer) => {
                let rcode = answer.response_code();
                report.rcode = Some(format!("{rcode:?}"));
                report.authoritative = answer.authoritative();
                report.addresses = answer
                    .answers()
                    .iter()
                    .filter_map(|r| match r.data() {
                        RData::A(a) => Some(a.0.to_string()),
                        RData::AAAA(a) => Some(a.0.to_string()),
                        _ => None,
                    })
                    .collect();
                report.tried.push((name, format!("{rcode:?}")));
                report.ok = rcode == ResponseCode::NoError && !report.addresses.is_empty();
                if report.ok || !matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain) {
                    break;
                }
            }
            Err(e) => {
                report.tried.push((name, "no answer".into()));
                report.error = Some(e);
                break;
            }
        }
    }
    if let (true, Some(port), Some(first)) = (report.ok, q.connect_port, report.addresses.first()) {
        let target = SocketAddr::new(first.parse().expect("an IP"), port).to_string();
        let connection = super::tcp_once(&target, b"hello by name\n", true, q.timeout).await;
        report.ok = connection.ok;
        report.connection = Some(connection);
    }
    if let Some(task) = upstream {
        task.abort();
    }
    report.upstream_asked = asked.lock().unwrap_or_else(|e| e.into_inner()).clone();
    report
}

/// Where to ask, and the names to ask for in order: `--server` and the name
/// as written, or resolv.conf's first nameserver and its search list's
/// expansions of the name.
fn destination(q: &Query) -> Result<(SocketAddr, Vec<String>), String> {
    if let Some(server) = &q.server {
        let server = server
            .parse()
            .or_else(|_| server.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
            .map_err(|_| format!("--server {server:?} is not ip[:port]"))?;
        return Ok((server, vec![q.name.clone()]));
    }
    let path = q.resolv_conf.display();
    let text = std::fs::read_to_string(&q.resolv_conf).map_err(|e| format!("{path}: {e}"))?;
    let (conf, problems) = api::resolv_conf::ResolvConf::parse(&text);
    for p in problems {
        eprintln!("{path}: skipped {p}");
    }
    let first = conf
        .nameservers
        .first()
        .ok_or_else(|| format!("{path}: no nameserver"))?;
    Ok((SocketAddr::new(*first, 53), conf.search.candidates(&q.name)))
}

/// Serves `records` on UDP `listen` until the task ends; returns why it
/// cannot serve.
pub async fn serve(listen: SocketAddr, records: &[String]) -> String {
    match serve_upstream(listen, records, Arc::default()).await {
        Ok(task) => match task.await {
            Ok(()) => format!("{listen}: the socket failed"),
            Err(e) => e.to_string(),
        },
        Err(e) => e,
    }
}

async fn ask(q: &Query, server: SocketAddr, name: &str) -> Result<Message, String> {
    let record_type: RecordType = q
        .record_type
        .parse()
        .map_err(|e| format!("--record-type: {e}"))?;
    let name = Name::from_ascii(name).map_err(|e| format!("{name:?}: {e}"))?;
    let mut query = Message::new();
    let id: u16 = rand::random();
    query
        .set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Question::query(name, record_type));
    let bytes = query.to_vec().map_err(|e| e.to_string())?;
    let unspecified = match server {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = UdpSocket::bind(unspecified)
        .await
        .map_err(|e| e.to_string())?;
    socket.connect(server).await.map_err(|e| e.to_string())?;
    socket.send(&bytes).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65_535];
    let n = tokio::time::timeout(q.timeout, socket.recv(&mut buf))
        .await
        .map_err(|_| format!("no answer from {server} within {:?}", q.timeout))?
        .map_err(|e| format!("{server}: {e}"))?;
    let answer = Message::from_vec(&buf[..n]).map_err(|e| format!("not DNS: {e}"))?;
    if answer.id() != id {
        return Err(format!("answer id {} is not the query's {id}", answer.id()));
    }
    Ok(answer)
}

/// Answers `name=ip` records (A) and NXDOMAIN otherwise, on UDP `addr`,
/// recording every name asked.
async fn serve_upstream(
    addr: SocketAddr,
    records: &[String],
    asked: Arc<Mutex<Vec<String>>>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let mut table: HashMap<String, Ipv4Addr> = HashMap::new();
    for record in records {
        let (name, ip) = record
            .split_once('=')
            .ok_or_else(|| format!("--upstream-record {record:?} is not NAME=IP"))?;
        let ip = ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IPv4 address"))?;
        table.insert(fqdn_lower(name), ip);
    }
    let socket = UdpSocket::bind(addr).await.map_err(|e| e.to_string())?;
    Ok(tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let Some(question) = query.queries().first().cloned() else {
                continue;
            };
            let name = fqdn_lower(&question.name().to_ascii());
            asked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(name.clone());
            let mut reply = Message::new();
            reply
                .set_id(query.id())
                .set_message_type(MessageType::Response)
                .set_op_code(OpCode::Query)
                .set_recursion_desired(query.recursion_desired())
                .set_recursion_available(true)
                .add_query(question.clone());
            match table.get(&name) {
                Some(ip) if question.query_type() == RecordType::A => {
                    reply.add_answer(Record::from_rdata(
                        question.name().clone(),
                        60,
                        RData::A(A(*ip)),
                    ));
                }
                Some(_) => {}
                None => {
                    reply.set_response_code(ResponseCode::NXDomain);
                }
            }
            if let Ok(bytes) = reply.to_vec() {
                let _ = socket.send_to(&bytes, peer).await;
            }
        }
    }))
}

fn fqdn_lower(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.').to_ascii_lowercase())
}
