//! One query to one upstream: UDP from a fresh socket, TCP when the UDP
//! reply is truncated.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use hickory_proto::op::{Message, Query};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{timeout_at, Instant};

use super::wire::{raw_header, reply_matches};
use super::DnsError;

/// Largest DNS message over TCP (and our UDP receive buffer).
const MAX_MESSAGE: usize = 65_535;

/// A reply that matched the question: decoded, and as received.
pub(crate) struct Reply {
    /// The decoded reply.
    pub(crate) msg: Message,
    /// The bytes as the upstream sent them.
    pub(crate) raw: Vec<u8>,
}

/// Sends `query` (whose id is `id` and question `q`) to `upstream` and
/// returns the first reply that matches, trying TCP when the UDP reply has
/// TC set. Gives up at `deadline` with [`DnsError::Timeout`].
pub(crate) async fn exchange(
    upstream: SocketAddr,
    query: &[u8],
    id: u16,
    q: &Query,
    deadline: Instant,
) -> Result<Reply, DnsError> {
    match udp(upstream, query, id, q, deadline).await? {
        Some(reply) => Ok(reply),
        None => tcp(upstream, query, id, q, deadline).await,
    }
}

/// The UDP leg. `Ok(None)` means "truncated: retry over TCP".
///
/// The socket is bound to a kernel-chosen (random) port and connected to
/// the upstream, so datagrams from any other address never reach us.
/// Replies that do not parse, are not responses, or carry another id or
/// question are ignored and the wait goes on.
async fn udp(
    upstream: SocketAddr,
    query: &[u8],
    id: u16,
    q: &Query,
    deadline: Instant,
) -> Result<Option<Reply>, DnsError> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(upstream).await?;
    match timeout_at(deadline, sock.send(query)).await {
        Err(_) => return Err(DnsError::Timeout),
        Ok(res) => res?,
    };
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let n = match timeout_at(deadline, sock.recv(&mut buf)).await {
            Err(_) => return Err(DnsError::Timeout),
            Ok(res) => res?,
        };
        let Some(data) = buf.get(..n) else {
            continue;
        };
        match Message::from_vec(data) {
            Ok(msg) if reply_matches(&msg, id, q) => {
                if msg.metadata.truncation {
                    return Ok(None);
                }
                return Ok(Some(Reply {
                    msg,
                    raw: data.to_vec(),
                }));
            }
            Ok(_) => continue,
            Err(_) => {
                // A truncated reply may be cut mid-record; its header is
                // still enough to know that TCP is needed.
                let truncated = data.get(2).is_some_and(|f| f & 0x02 != 0);
                if truncated && raw_header(data).is_some_and(|(rid, _, _, qr)| rid == id && qr) {
                    return Ok(None);
                }
            }
        }
    }
}

/// The TCP leg: one length-prefixed query, one length-prefixed reply, which
/// must match (a mismatch on a stream is an error, not noise).
async fn tcp(
    upstream: SocketAddr,
    query: &[u8],
    id: u16,
    q: &Query,
    deadline: Instant,
) -> Result<Reply, DnsError> {
    let len = u16::try_from(query.len()).map_err(|_| DnsError::Malformed("query too long"))?;
    let exchange = async {
        let mut stream = TcpStream::connect(upstream).await?;
        let mut frame = Vec::with_capacity(query.len() + 2);
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(query);
        stream.write_all(&frame).await?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let mut raw = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut raw).await?;
        let msg = Message::from_vec(&raw)
            .map_err(|_| DnsError::Malformed("unparseable reply over TCP"))?;
        if !reply_matches(&msg, id, q) {
            return Err(DnsError::Malformed("TCP reply does not match the question"));
        }
        Ok(Reply { msg, raw })
    };
    match timeout_at(deadline, exchange).await {
        Err(_) => Err(DnsError::Timeout),
        Ok(res) => res,
    }
}
