//! The in-pod socket layer in real network namespaces (root; skipped loudly
//! without, required under CI): sockets are created inside the pod, carry the
//! proxy mark, and the original destination is read for IPv4 and IPv6.

use std::net::SocketAddr;
use std::time::Duration;

use ztunnel_rs::inpod::testing::{TestNetns, root_or_skip};
use ztunnel_rs::inpod::{InPodListeners, InPodSocketFactory, Netns};
use ztunnel_rs::node_agent::iptables::{self, RedirectionConfig};

const WAIT: Duration = Duration::from_secs(30);

async fn connect_from(netns: &Netns, to: SocketAddr) -> std::net::TcpStream {
    netns
        .run_async(move || std::net::TcpStream::connect_timeout(&to, WAIT))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("connect to {to}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_live_in_the_pod_and_carry_the_proxy_mark() {
    if !root_or_skip("sockets_live_in_the_pod_and_carry_the_proxy_mark") {
        return;
    }
    let pod = TestNetns::new();
    let peer = TestNetns::new();
    pod.link("10.244.251.1/24", &peer, "10.244.251.2/24");
    let before = Netns::current().unwrap();

    let factory = InPodSocketFactory::new(pod.netns.clone());
    let listeners = InPodListeners::bind(&factory).await.unwrap();
    // Entering the pod happened on threads of its own: ours is untouched.
    assert_eq!(Netns::current().unwrap(), before);
    for (listener, port) in [
        (&listeners.outbound, 15001),
        (&listeners.inbound_plaintext, 15006),
        (&listeners.hbone, 15008),
    ] {
        let local = listener.local_addr().unwrap();
        assert_eq!(
            local,
            SocketAddr::new("::".parse().unwrap(), port),
            "dual-stack wildcard"
        );
        assert_eq!(
            socket2::SockRef::from(listener).mark().unwrap(),
            api::ports::PROXY_MARK
        );
    }
    // Reachable on the pod's loopback, i.e. they are in the pod's netns.
    let _local = connect_from(&pod.netns, "127.0.0.1:15006".parse().unwrap()).await;
    let (accepted, _) = listeners.inbound_plaintext.accept().await.unwrap();
    drop(accepted);

    // Outgoing connections leave from the pod's address, marked.
    let peer_server = peer
        .netns
        .run_async(|| std::net::TcpListener::bind("0.0.0.0:7070"))
        .await
        .unwrap()
        .unwrap();
    let stream = factory
        .connect("10.244.251.2:7070".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(
        socket2::SockRef::from(&stream).mark().unwrap(),
        api::ports::PROXY_MARK
    );
    assert_eq!(
        stream.local_addr().unwrap().ip().to_string(),
        "10.244.251.1"
    );
    let (_, seen) = peer_server.accept().unwrap();
    assert_eq!(seen.ip().to_string(), "10.244.251.1");

    // Nothing listens there: a clear error naming the target.
    let refused = factory.connect("10.244.251.2:7071".parse().unwrap()).await;
    let message = refused.unwrap_err().to_string();
    assert!(message.contains("10.244.251.2:7071"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn original_destination_of_redirected_ipv6_and_ipv4_connections() {
    if !root_or_skip("original_destination_of_redirected_ipv6_and_ipv4_connections") {
        return;
    }
    let pod = TestNetns::new();
    let peer = TestNetns::new();
    pod.link("10.244.252.1/24", &peer, "10.244.252.2/24");
    pod.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd00:252::1/64",
        "dev",
        &pod.veth(),
        "nodad",
    ]);
    peer.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd00:252::2/64",
        "dev",
        &peer.veth(),
        "nodad",
    ]);
    let config = RedirectionConfig::default();
    pod.netns
        .run(|| iptables::install(&config))
        .unwrap()
        .unwrap();

    let factory = InPodSocketFactory::new(pod.netns.clone());
    let listeners = InPodListeners::bind(&factory).await.unwrap();
    for target in ["[fd00:252::2]:9091", "10.244.252.2:9092"] {
        let target: SocketAddr = target.parse().unwrap();
        let _app = connect_from(&pod.netns, target).await;
        let (captured, _) = tokio::time::timeout(WAIT, listeners.outbound.accept())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(InPodSocketFactory::original_dst(&captured).unwrap(), target);
    }

    pod.netns
        .run(|| iptables::remove(&config))
        .unwrap()
        .unwrap();
    let left = pod.exec(&["iptables-save"]) + &pod.exec(&["ip6tables-save"]);
    assert!(!left.contains("ISTIO"), "{left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_the_app_can_keep_the_clients_address() {
    if !root_or_skip("connections_to_the_app_can_keep_the_clients_address") {
        return;
    }
    let pod = TestNetns::new();
    let peer = TestNetns::new();
    pod.link("10.244.252.1/24", &peer, "10.244.252.2/24");
    // The node agent's rules and routing bring the app's replies back.
    pod.netns
        .run(|| iptables::install(&RedirectionConfig::default()))
        .unwrap()
        .unwrap();
    let app = pod
        .netns
        .run_async(|| std::net::TcpListener::bind("0.0.0.0:8080"))
        .await
        .unwrap()
        .unwrap();
    let factory = InPodSocketFactory::new(pod.netns.clone());
    // A client address that is not the pod's: the peer pod's.
    let client_ip = "10.244.252.2".parse().unwrap();
    let mut conns = Vec::new();
    for _ in 0..3 {
        let conn = factory
            .connect_as("10.244.252.1:8080".parse().unwrap(), client_ip)
            .await
            .unwrap();
        // The port comes from connect(2), by 4-tuple, not from a scan of
        // every bound port at bind(2).
        assert!(
            nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::IpBindAddressNoPort)
                .unwrap()
        );
        let (accepted, seen) = app.accept().unwrap();
        assert_eq!(seen.ip(), client_ip, "the app sees the client's address");
        assert_eq!(conn.local_addr().unwrap(), seen);
        conns.push((conn, accepted));
    }
    // Replies reach the proxy's socket (routed back by connmark), both ways.
    use std::io::{Read, Write};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for (conn, accepted) in &mut conns {
        conn.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        accepted.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        accepted.write_all(b"pong").unwrap();
        tokio::time::timeout(WAIT, conn.read_exact(&mut buf))
            .await
            .expect("the reply came back to the proxy's socket")
            .unwrap();
        assert_eq!(&buf, b"pong");
    }
}

/// A rolling restart of the ztunnel DaemonSet starts the new ztunnel beside
/// the old one, and the node agent hands it every pod while the old one
/// still listens there: the new listeners must bind beside the old ones
/// (SO_REUSEPORT), and once the old ones close the new ones take every
/// connection. Without that the new ztunnel refuses every pod and, once
/// the old one drained, nothing listens in the pods at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_proxy_listens_beside_the_old_one_and_takes_over() {
    if !root_or_skip("a_new_proxy_listens_beside_the_old_one_and_takes_over") {
        return;
    }
    let pod = TestNetns::new();
    let factory = InPodSocketFactory::new(pod.netns.clone());
    let hbone = api::ports::HBONE;
    assert!(
        !factory.listened(hbone).unwrap(),
        "nothing listens in a new pod"
    );
    let old = InPodListeners::bind(&factory).await.unwrap();
    // What a new proxy checks before it opens its own listeners.
    assert!(
        factory.listened(hbone).unwrap(),
        "the old proxy's listener is seen"
    );
    assert!(!factory.listened(hbone + 100).unwrap());
    let new = InPodListeners::bind(&factory)
        .await
        .expect("a second proxy's listeners bind beside the first's");
    for listener in [&new.outbound, &new.inbound_plaintext, &new.hbone] {
        assert!(socket2::SockRef::from(listener).reuse_port().unwrap());
    }
    drop(old);
    for _ in 0..8 {
        let _client = connect_from(&pod.netns, "127.0.0.1:15006".parse().unwrap()).await;
        let accepted = tokio::time::timeout(WAIT, new.inbound_plaintext.accept()).await;
        assert!(
            matches!(accepted, Ok(Ok(_))),
            "the new listener took the connection"
        );
    }
}
