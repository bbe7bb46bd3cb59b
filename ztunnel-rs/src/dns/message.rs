//! DNS messages in and out, through hickory-proto: what a datagram or TCP
//! frame from a client is, and the bytes of the answers.
//!
//! A client's bytes are one of: a query to serve; something answered with
//! an error code (a readable header but no readable question: FORMERR; an
//! operation other than QUERY: NOTIMP); or something dropped (too short for
//! a header, or a response: answering those could loop two resolvers).

use hickory_proto::op::{Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

/// A classic UDP answer's limit without EDNS (RFC 1035).
pub const UDP_MIN_PAYLOAD: u16 = 512;

/// A client's query.
#[derive(Clone, Debug)]
pub struct Request {
    pub message: Message,
}

impl Request {
    /// The one question (checked by [`parse`]).
    pub fn query(&self) -> &Query {
        &self.message.queries()[0]
    }

    /// The largest UDP answer the client takes (its EDNS size, at least 512).
    pub fn max_udp_payload(&self) -> u16 {
        self.message
            .extensions()
            .as_ref()
            .map_or(UDP_MIN_PAYLOAD, |e| e.max_payload().max(UDP_MIN_PAYLOAD))
    }
}

/// What a client sent when it is not a query to serve.
#[derive(Debug)]
pub enum Rejected {
    /// Answer with these bytes (an error code for the client's id).
    Reply(Vec<u8>, ResponseCode),
    /// Nothing to answer; the reason is for the (bounded) log.
    Drop(&'static str),
}

/// Reads a client's message.
pub fn parse(bytes: &[u8]) -> Result<Request, Rejected> {
    let header = Header::read(&mut BinDecoder::new(bytes))
        .map_err(|_| Rejected::Drop("shorter than a DNS header"))?;
    if header.message_type() != MessageType::Query {
        return Err(Rejected::Drop("a response, not a query"));
    }
    let error = |code: ResponseCode| {
        let mut reply = Message::error_msg(header.id(), header.op_code(), code);
        reply.set_recursion_desired(header.recursion_desired());
        match reply.to_vec() {
            Ok(bytes) => Rejected::Reply(bytes, code),
            Err(_) => Rejected::Drop("cannot encode an error answer"),
        }
    };
    if header.op_code() != OpCode::Query {
        return Err(error(ResponseCode::NotImp));
    }
    let message = Message::from_vec(bytes).map_err(|_| error(ResponseCode::FormErr))?;
    if message.queries().len() != 1 {
        return Err(error(ResponseCode::FormErr));
    }
    Ok(Request { message })
}

/// The answer to `request` with `code` and `answers`.
pub fn response(
    request: &Request,
    code: ResponseCode,
    authoritative: bool,
    answers: Vec<Record>,
) -> Message {
    let mut reply = Message::new();
    reply
        .set_id(request.message.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_authoritative(authoritative)
        .set_recursion_desired(request.message.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code)
        .add_query(request.query().clone())
        .add_answers(answers);
    reply
}

/// The bytes of `reply`; over UDP (`limit` set) an answer longer than the
/// client takes is sent truncated (TC set, no records), so the client asks
/// again over TCP.
pub fn encode(reply: &Message, limit: Option<u16>) -> Result<Vec<u8>, hickory_proto::ProtoError> {
    let bytes = reply.to_vec()?;
    match limit {
        Some(limit) if bytes.len() > usize::from(limit) => reply.truncate().to_vec(),
        _ => Ok(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::{Name, RecordType};

    fn query_bytes(id: u16, name: &str) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(id)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    #[test]
    fn a_query_parses_and_its_answer_keeps_id_and_question() {
        let request = parse(&query_bytes(7, "echo.default.")).unwrap();
        assert_eq!(request.query().query_type(), RecordType::A);
        assert_eq!(request.max_udp_payload(), 512);
        let reply = response(&request, ResponseCode::NoError, true, vec![]);
        let back = Message::from_vec(&encode(&reply, Some(512)).unwrap()).unwrap();
        assert_eq!(back.id(), 7);
        assert_eq!(back.message_type(), MessageType::Response);
        assert!(back.authoritative() && back.recursion_desired());
        assert_eq!(back.queries(), request.message.queries());
    }

    #[test]
    fn garbage_is_dropped_or_answered_formerr() {
        assert!(matches!(parse(b"\x01\x02"), Err(Rejected::Drop(_))));
        // A header announcing a question that is not there.
        let mut bytes = query_bytes(9, "echo.");
        bytes.truncate(14);
        match parse(&bytes) {
            Err(Rejected::Reply(reply, ResponseCode::FormErr)) => {
                let reply = Message::from_vec(&reply).unwrap();
                assert_eq!(reply.id(), 9);
                assert_eq!(reply.response_code(), ResponseCode::FormErr);
            }
            other => panic!("expected FORMERR, got {other:?}"),
        }
        // A response sent to us is not answered.
        let mut response = Message::from_vec(&query_bytes(3, "x.")).unwrap();
        response.set_message_type(MessageType::Response);
        assert!(matches!(
            parse(&response.to_vec().unwrap()),
            Err(Rejected::Drop(_))
        ));
    }

    #[test]
    fn an_answer_too_long_for_udp_is_truncated() {
        let request = parse(&query_bytes(1, "big.")).unwrap();
        let records = (0..100u8)
            .map(|i| {
                Record::from_rdata(
                    Name::from_ascii("big.").unwrap(),
                    30,
                    hickory_proto::rr::RData::A(hickory_proto::rr::rdata::A::new(10, 0, 0, i)),
                )
            })
            .collect();
        let reply = response(&request, ResponseCode::NoError, true, records);
        let udp = Message::from_vec(&encode(&reply, Some(512)).unwrap()).unwrap();
        assert!(udp.truncated());
        assert!(udp.answers().is_empty());
        let tcp = Message::from_vec(&encode(&reply, None).unwrap()).unwrap();
        assert!(!tcp.truncated());
        assert_eq!(tcp.answers().len(), 100);
    }
}
