use std::collections::HashMap;
use std::pin::Pin;

use futures::{Stream, StreamExt};
use strait_proto::destination::v1::destination_server::{
    Destination as DestinationApi, DestinationServer,
};
use strait_proto::destination::v1::{AddressSet, NoEndpoints, WeightedAddr};
use tonic::{Request, Response, Status};

use super::*;

const ID: &str = "spiffe://west.strait.local/ns/demo/sa/hello";

fn addr(a: &str, identity: &str, weight: u32) -> WeightedAddr {
    WeightedAddr {
        addr: a.into(),
        weight,
        identity: identity.into(),
        protocol_hint: 0,
    }
}

fn set(addrs: Vec<WeightedAddr>) -> Update {
    Update {
        update: Some(update::Update::Set(AddressSet { addrs })),
    }
}

fn no_endpoints(exists: bool) -> Update {
    Update {
        update: Some(update::Update::NoEndpoints(NoEndpoints { exists })),
    }
}

#[test]
fn updates_convert_to_destinations() {
    let d = answer(&set(vec![
        addr("10.0.0.1:80", "", 0),
        addr("10.0.0.2:80", ID, 5),
    ]))
    .expect("an answer")
    .expect("endpoints");
    assert_eq!(
        d.endpoints,
        vec![
            Endpoint {
                addr: "10.0.0.1:80".parse().expect("addr"),
                identity: None,
                weight: 1,
            },
            Endpoint {
                addr: "10.0.0.2:80".parse().expect("addr"),
                identity: Some(SpiffeId::parse(ID).expect("id")),
                weight: 5,
            },
        ]
    );
    assert_eq!(answer(&no_endpoints(true)), Some(None));
    assert_eq!(answer(&no_endpoints(false)), Some(None));
    assert_eq!(answer(&Update { update: None }), None, "empty: ignored");
    assert_eq!(answer(&set(vec![])), Some(None));
}

#[test]
fn invalid_endpoints_are_left_out_never_downgraded() {
    let d = answer(&set(vec![
        addr("nope", "", 1),
        addr("10.0.0.3:80", "http://not-spiffe", 1),
        addr("10.0.0.4:80", ID, 1),
    ]))
    .expect("an answer")
    .expect("endpoints");
    assert_eq!(d.endpoints.len(), 1);
    assert_eq!(d.endpoints[0].addr, "10.0.0.4:80".parse().expect("addr"));
    assert_eq!(
        answer(&set(vec![addr("10.0.0.3:80", "spiffe://", 1)])),
        Some(None),
        "nothing valid left: no endpoints"
    );
}

#[test]
fn control_plane_addresses_parse() {
    for ok in [
        "127.0.0.1:8086",
        "http://127.0.0.1:8086",
        "http://127.0.0.1:8086/",
        "strait-gateway.strait-system.svc:8086",
        "[::1]:8086",
    ] {
        assert!(GrpcResolver::parse(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "127.0.0.1",
        "127.0.0.1:0",
        "https://gw:8086",
        "http://gw:8086/x",
        "gw:port",
        ":8086",
    ] {
        assert!(GrpcResolver::parse(bad).is_err(), "{bad}");
    }
}

/// What the scripted control plane does for an authority.
#[derive(Clone)]
enum Route {
    /// Sends the watch's values; ends when it holds `None` or closes.
    Stream(watch::Receiver<Option<Update>>),
    /// Refuses with this code.
    Refuse(tonic::Code),
    /// Accepts and never answers.
    Hang,
}

#[derive(Clone, Default)]
struct Mock {
    routes: Arc<Mutex<HashMap<String, Route>>>,
    calls: Arc<Mutex<Vec<String>>>,
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<Update, Status>> + Send>>;

#[tonic::async_trait]
impl DestinationApi for Mock {
    type GetStream = UpdateStream;

    async fn get(
        &self,
        request: Request<GetDestination>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let authority = request.into_inner().authority;
        self.calls.lock().expect("lock").push(authority.clone());
        let route = self.routes.lock().expect("lock").get(&authority).cloned();
        let stream: UpdateStream = match route {
            None => Box::pin(
                futures::stream::once(async { Ok(no_endpoints(false)) })
                    .chain(futures::stream::pending()),
            ),
            Some(Route::Refuse(code)) => return Err(Status::new(code, "scripted")),
            Some(Route::Hang) => Box::pin(futures::stream::pending()),
            Some(Route::Stream(rx)) => Box::pin(futures::stream::unfold(
                (rx, true),
                |(mut rx, first)| async move {
                    if !first && rx.changed().await.is_err() {
                        return None;
                    }
                    let next = rx.borrow_and_update().clone()?;
                    Some((Ok(next), (rx, false)))
                },
            )),
        };
        Ok(Response::new(stream))
    }
}

impl Mock {
    async fn serve(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let svc = DestinationServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        addr
    }

    fn route(&self, authority: &str, route: Route) {
        self.routes
            .lock()
            .expect("lock")
            .insert(authority.into(), route);
    }

    fn calls(&self, authority: &str) -> usize {
        self.calls
            .lock()
            .expect("lock")
            .iter()
            .filter(|a| *a == authority)
            .count()
    }
}

fn addrs(d: &Option<Destination>) -> Vec<String> {
    d.as_ref()
        .map(|d| d.endpoints.iter().map(|e| e.addr.to_string()).collect())
        .unwrap_or_default()
}

/// Resolves until `want` holds, for up to 5 s.
async fn eventually(
    r: &GrpcResolver,
    authority: &str,
    want: impl Fn(&Option<Destination>) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let d = r.resolve(authority).await;
        if want(&d) {
            return;
        }
        assert!(Instant::now() < deadline, "{authority}: last saw {d:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn follows_a_stream_from_the_cache() {
    let mock = Mock::default();
    let (tx, rx) = watch::channel(Some(set(vec![
        addr("10.0.0.1:80", ID, 1),
        addr("10.0.0.2:80", "", 1),
    ])));
    mock.route("web.demo:80", Route::Stream(rx));
    // Answered: a timeout far above the default, for a loaded machine.
    let r = GrpcResolver::for_addr(mock.serve().await).with_timeout(Duration::from_secs(5));

    let d = r.resolve("Web.Demo:80").await;
    assert_eq!(addrs(&d), ["10.0.0.1:80", "10.0.0.2:80"]);
    assert_eq!(
        d.as_ref().and_then(|d| d.endpoints[0].identity.clone()),
        Some(SpiffeId::parse(ID).expect("id"))
    );
    for _ in 0..5 {
        assert_eq!(addrs(&r.resolve("web.demo:80").await).len(), 2);
    }
    assert_eq!(mock.calls("web.demo:80"), 1, "one stream, then the cache");

    tx.send_replace(Some(set(vec![addr("10.0.0.2:80", "", 1)])));
    eventually(&r, "web.demo:80", |d| addrs(d) == ["10.0.0.2:80"]).await;
    tx.send_replace(Some(no_endpoints(true)));
    eventually(&r, "web.demo:80", Option::is_none).await;
    assert_eq!(mock.calls("web.demo:80"), 1);

    // The stream ends: the name is dropped and asked again.
    let (_tx2, rx2) = watch::channel(Some(set(vec![addr("10.0.0.3:80", "", 1)])));
    mock.route("web.demo:80", Route::Stream(rx2));
    tx.send_replace(None);
    eventually(&r, "web.demo:80", |d| addrs(d) == ["10.0.0.3:80"]).await;
    assert_eq!(mock.calls("web.demo:80"), 2, "the new stream's answer");
}

#[tokio::test]
async fn the_control_plane_is_waited_for_before_the_resolvers_after_it() {
    use crate::discovery::{destination, Chain, StaticResolver};
    let mock = Mock::default();
    let (_tx, rx) = watch::channel(Some(set(vec![addr("10.0.0.1:80", ID, 1)])));
    mock.route("web.demo:80", Route::Stream(rx));
    let r = GrpcResolver::for_addr(mock.serve().await).with_timeout(Duration::from_secs(5));
    let file = "destinations:\n  - authority: web.demo:80\n    endpoints:\n      - { addr: 10.9.9.9:80 }\n";
    let fallback = StaticResolver::parse(file, "x").expect("valid");
    let chain = Chain(vec![Box::new(r), Box::new(fallback)]);
    // Asked, not answered yet: the chain would wait, not take the file's.
    assert_eq!(chain.known("web.demo:80"), Known::Later);
    assert!(chain.peek("web.demo:80").is_some(), "peek takes any answer");
    assert_eq!(
        addrs(&destination(&chain, "web.demo:80").await),
        ["10.0.0.1:80"]
    );
    // Answered: the control plane's, at once.
    match chain.known("web.demo:80") {
        Known::Now(d) => assert_eq!(addrs(&d), ["10.0.0.1:80"]),
        Known::Later => panic!("answered, yet it would wait"),
    }
    assert_eq!(mock.calls("web.demo:80"), 1);
    // A name without a port is not the control plane's: the next resolver's.
    assert_eq!(chain.known("web"), Known::Now(None));
}

#[tokio::test]
async fn unknown_and_refused_names_fall_back_and_are_cached() {
    let mock = Mock::default();
    mock.route(
        "api.example.com:443",
        Route::Refuse(tonic::Code::InvalidArgument),
    );
    mock.route("broken.demo:80", Route::Refuse(tonic::Code::Internal));
    let r = GrpcResolver::for_addr(mock.serve().await);
    for _ in 0..3 {
        assert!(r.resolve("nope.demo:80").await.is_none());
        assert!(r.resolve("api.example.com:443").await.is_none());
    }
    assert_eq!(mock.calls("nope.demo:80"), 1, "no endpoints is an answer");
    assert_eq!(mock.calls("api.example.com:443"), 1, "refused for good");
    assert!(r.resolve("broken.demo:80").await.is_none());
    eventually(&r, "broken.demo:80", |_| mock.calls("broken.demo:80") >= 2).await;
    assert!(r.resolve("no-port").await.is_none());
    assert_eq!(mock.calls("no-port"), 0, "not even asked");
}

#[tokio::test]
async fn a_silent_control_plane_costs_one_timeout_then_nothing() {
    let mock = Mock::default();
    mock.route("slow.demo:80", Route::Hang);
    let r = GrpcResolver::for_addr(mock.serve().await)
        .with_timeout(Duration::from_millis(200))
        .with_retry_after(Duration::from_secs(30));
    let started = Instant::now();
    assert!(r.resolve("slow.demo:80").await.is_none());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // The watch gives up too, and the control plane is then skipped.
    eventually(&r, "slow.demo:80", |_| r.watches() == 0).await;
    // Not asked at all (the proof); the bound only catches a hang.
    let started = Instant::now();
    assert!(r.resolve("other.demo:80").await.is_none());
    assert_eq!(mock.calls("other.demo:80"), 0);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_dead_control_plane_falls_back_fast() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let r = GrpcResolver::for_addr(dead).with_retry_after(Duration::from_millis(100));
    let started = Instant::now();
    assert!(r.resolve("web.demo:80").await.is_none());
    assert!(started.elapsed() < Duration::from_secs(2));
    eventually(&r, "web.demo:80", |_| r.watches() == 0).await;
    // Retried after `retry_after`, still quickly refused.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = Instant::now();
    assert!(r.resolve("web.demo:80").await.is_none());
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn idle_names_are_dropped() {
    let mock = Mock::default();
    let r = GrpcResolver::for_addr(mock.serve().await).with_idle_timeout(Duration::ZERO);
    assert!(r.resolve("a.demo:80").await.is_none());
    assert_eq!(r.watches(), 1);
    // Sweeps run at most once a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(r.resolve("b.demo:80").await.is_none());
    assert_eq!(r.watches(), 1, "a.demo dropped, b.demo added");
    assert!(r.resolve("a.demo:80").await.is_none());
    assert_eq!(mock.calls("a.demo:80"), 2);
}
