//! DNS test helpers (feature `testing`): a resolver on loopback standing in
//! for the cluster's DNS, and a client sending one query over UDP or TCP.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::{TcpListener, TcpSocket, UdpSocket};

use super::forwarder::{Protocol, read_frame, write_frame};

/// The address [`TestResolver`] gives `known.example.`.
pub const KNOWN_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

/// The addresses [`TestResolver`] gives `dual.example.`: A (TTL
/// [`DUAL_TTL_A`]) and AAAA (TTL [`DUAL_TTL_AAAA`]).
pub const DUAL_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 8);
pub const DUAL_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 8);
pub const DUAL_TTL_A: u32 = 60;
pub const DUAL_TTL_AAAA: u32 = 30;

/// An upstream resolver on one loopback address, UDP and TCP on one port:
/// `known.example.` has [`KNOWN_ADDRESS`]; `dual.example.` has
/// [`DUAL_V4`] and [`DUAL_V6`]; `big.example.` has 100 addresses (over UDP
/// it answers truncated, as a real server does for a 512-byte client);
/// every other name is NXDOMAIN. A name's other record types have no
/// record (NOERROR, empty). It records each question and the protocol it
/// came on ([`Self::seen`]) and its type ([`Self::seen_types`]).
#[derive(Clone, Debug)]
pub struct TestResolver {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<(String, Protocol)>>>,
    types: Arc<Mutex<Vec<(String, RecordType)>>>,
    /// Names added by [`Self::set_record`], lower case and absolute.
    records: Arc<Mutex<HashMap<String, Vec<IpAddr>>>>,
}

impl TestResolver {
    pub async fn start(ip: IpAddr) -> TestResolver {
        let tcp = TcpListener::bind(SocketAddr::new(ip, 0))
            .await
            .expect("bind resolver tcp");
        let addr = tcp.local_addr().expect("resolver address");
        let udp = UdpSocket::bind(addr).await.expect("bind resolver udp");
        let seen: Arc<Mutex<Vec<(String, Protocol)>>> = Arc::default();
        let resolver = TestResolver {
            addr,
            seen,
            types: Arc::default(),
            records: Arc::default(),
        };
        let r = resolver.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                if let Some(answer) = r.answer(&buf[..n], Protocol::Udp) {
                    let _ = udp.send_to(&answer, peer).await;
                }
            }
        });
        let r = resolver.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = tcp.accept().await {
                let r = r.clone();
                tokio::spawn(async move {
                    while let Ok(Some(query)) = read_frame(&mut stream).await {
                        let Some(answer) = r.answer(&query, Protocol::Tcp) else {
                            return;
                        };
                        if write_frame(&mut stream, &answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        resolver
    }

    /// The questions received so far: `(name, protocol)`.
    pub fn seen(&self) -> Vec<(String, Protocol)> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// From now on `name` has these addresses (A or AAAA by their family,
    /// TTL 60); none: NOERROR without records.
    pub fn set_record(&self, name: &str, ips: &[IpAddr]) {
        let name = format!("{}.", name.trim_end_matches('.').to_ascii_lowercase());
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, ips.to_vec());
    }

    /// The questions received so far: `(name, record type)`.
    pub fn seen_types(&self) -> Vec<(String, RecordType)> {
        self.types.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn answer(&self, bytes: &[u8], protocol: Protocol) -> Option<Vec<u8>> {
        let query = Message::from_vec(bytes).ok()?;
        let question = query.queries().first()?.clone();
        let name = question.name().to_ascii();
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.clone(), protocol));
        self.types
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.clone(), question.query_type()));
        let asked = question.query_type();
        let mut reply = Message::new();
        reply
            .set_id(query.id())
            .set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(query.recursion_desired())
            .set_recursion_available(true)
            .add_query(question.clone());
        let a = |ip: Ipv4Addr| Record::from_rdata(question.name().clone(), 60, RData::A(A(ip)));
        let extra = self
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&name.to_lowercase())
            .cloned();
        if let Some(ips) = extra {
            for ip in &ips {
                let data = match (ip, asked) {
                    (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                    (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                    _ => continue,
                };
                reply.add_answer(Record::from_rdata(question.name().clone(), 60, data));
            }
            return reply.to_vec().ok();
        }
        match name.to_lowercase().as_str() {
            "known.example." if asked == RecordType::A => {
                reply.add_answer(a(KNOWN_ADDRESS));
            }
            "dual.example." if asked == RecordType::A => {
                reply.add_answer(Record::from_rdata(
                    question.name().clone(),
                    DUAL_TTL_A,
                    RData::A(A(DUAL_V4)),
                ));
            }
            "dual.example." if asked == RecordType::AAAA => {
                reply.add_answer(Record::from_rdata(
                    question.name().clone(),
                    DUAL_TTL_AAAA,
                    RData::AAAA(AAAA(DUAL_V6)),
                ));
            }
            "known.example." | "dual.example." => {}
            "big.example." if protocol == Protocol::Udp => {
                reply.set_truncated(true);
            }
            "big.example." => {
                reply.add_answers((0..100).map(|i| a(Ipv4Addr::new(198, 51, 100, i))));
            }
            _ => {
                reply.set_response_code(ResponseCode::NXDomain);
            }
        }
        reply.to_vec().ok()
    }
}

/// A query for `name` of `record_type` with id `id`.
pub fn query(id: u16, name: &str, record_type: RecordType) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(
            Name::from_ascii(name).expect("a DNS name"),
            record_type,
        ));
    m.to_vec().expect("encode the query")
}

/// Sends `query` from `from` to `server` over UDP; the answer, if one comes
/// within `patience`.
pub async fn exchange_udp(
    from: IpAddr,
    server: SocketAddr,
    query: &[u8],
    patience: std::time::Duration,
) -> Option<Message> {
    let socket = UdpSocket::bind(SocketAddr::new(from, 0))
        .await
        .expect("bind client");
    socket.send_to(query, server).await.expect("send the query");
    let mut buf = vec![0u8; 65_535];
    let (n, _) = tokio::time::timeout(patience, socket.recv_from(&mut buf))
        .await
        .ok()?
        .expect("receive");
    Some(Message::from_vec(&buf[..n]).expect("the answer is DNS"))
}

/// Sends `query` from `from` to `server` over TCP and reads the answer.
pub async fn exchange_tcp(from: IpAddr, server: SocketAddr, query: &[u8]) -> Message {
    let socket = match from {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind client");
    let mut stream = socket
        .connect(server)
        .await
        .expect("connect to the DNS proxy");
    write_frame(&mut stream, query)
        .await
        .expect("send the query");
    let answer = read_frame(&mut stream)
        .await
        .expect("read the answer")
        .expect("an answer before the end of the stream");
    Message::from_vec(&answer).expect("the answer is DNS")
}

/// The addresses of the A/AAAA records of `answer`, sorted.
pub fn addresses(answer: &Message) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = answer
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    ips.sort();
    ips
}
