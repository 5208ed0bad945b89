//! The routing table, without a socket: every path × transport × sid state × fleet state ×
//! upgrade × handoff setting, then properties over arbitrary requests.

use std::net::IpAddr;
use std::sync::Arc;

use proptest::prelude::*;
use shared::FleetConfig;
use shared::config::Placement as Policy;

use super::*;
use crate::placement;
use crate::sticky::{Tag, TaggedSid};
use crate::workers::{Snapshot, Worker};

/// w0 and w1 up (unless `none_up`), w2 down.
fn fleet(none_up: bool) -> Snapshot {
    let workers: Vec<Arc<Worker>> = (0..3u16)
        .map(|i| {
            let w = Worker::new(
                format!("127.0.0.1:{}", 9001 + i).parse().unwrap(),
                &format!("w{i}"),
                "fleet",
            );
            w.set_up(i < 2 && !none_up);
            Arc::new(w)
        })
        .collect();
    let config = placement::Config {
        policy: Policy::Consistent,
        load_factor: 1.25,
    };
    Snapshot::new(workers, &config)
}

fn router(handoff: bool) -> Router {
    let mut cfg = FleetConfig::default();
    cfg.workers.handoff = handoff;
    Router::new(&cfg)
}

fn request<'a>(path: &'a str, query: Option<&'a str>, upgrade: bool) -> Request<'a> {
    Request {
        path,
        query,
        upgrade,
        preflight: false,
        origin: None,
        head_bytes: 200,
        client: Some(IpAddr::from([10, 0, 0, 1])),
        nonce: 7,
    }
}

fn refusal(d: &Decision) -> Option<Refusal> {
    match d {
        Decision::Refuse(r) => Some(*r),
        Decision::Route(_) | Decision::Preflight => None,
    }
}

fn route(d: Decision) -> Route {
    match d {
        Decision::Route(r) => r,
        Decision::Refuse(r) => panic!("refused: {r:?}"),
        Decision::Preflight => panic!("taken for a preflight"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Sid {
    None,
    Malformed,
    UnknownTag,
    OfDownWorker,
    OfUpWorker,
}

fn sid_text(state: Sid, fleet: &Snapshot) -> Option<String> {
    let tagged = |i: usize| TaggedSid::encode(fleet.workers()[i].tag(), "AAAAAAAAAAAAAAAA");
    match state {
        Sid::None => None,
        Sid::Malformed => Some("no-tag-here".into()),
        Sid::UnknownTag => Some(TaggedSid::encode(Tag::derive("x", "y"), "AAAA")),
        Sid::OfDownWorker => Some(tagged(2)),
        Sid::OfUpWorker => Some(tagged(1)),
    }
}

/// Every combination, against the rules as the module docs state them.
#[test]
fn the_whole_table() {
    let paths = [
        ("/socket.io/", true),
        ("/socket.io", true),
        ("/socket.io/x", true),
        ("/socket.iox/", false),
        ("/", false),
        ("/metrics", false),
    ];
    let transports = [Some("polling"), Some("websocket"), None, Some("flash")];
    let sids = [
        Sid::None,
        Sid::Malformed,
        Sid::UnknownTag,
        Sid::OfDownWorker,
        Sid::OfUpWorker,
    ];
    let mut rows = 0;
    for none_up in [false, true] {
        let fleet = fleet(none_up);
        for handoff in [false, true] {
            let router = router(handoff);
            for (path, ours) in paths {
                for transport in transports {
                    for sid in sids {
                        for upgrade in [false, true] {
                            let mut query = String::from("EIO=4");
                            if let Some(t) = transport {
                                query.push_str(&format!("&transport={t}"));
                            }
                            let sid_value = sid_text(sid, &fleet);
                            if let Some(s) = &sid_value {
                                query.push_str(&format!("&sid={s}"));
                            }
                            let req = request(path, Some(&query), upgrade);
                            let got = router.route(&req, &fleet);
                            let case = format!(
                                "{path} {query} upgrade={upgrade} handoff={handoff} none_up={none_up}"
                            );
                            check_row(&got, ours, transport, sid, none_up, upgrade, handoff, &case);
                            rows += 1;
                        }
                    }
                }
            }
        }
    }
    assert_eq!(rows, 2 * 2 * 6 * 4 * 5 * 2);
}

#[allow(clippy::too_many_arguments)]
fn check_row(
    got: &Decision,
    ours: bool,
    transport: Option<&str>,
    sid: Sid,
    none_up: bool,
    upgrade: bool,
    handoff: bool,
    case: &str,
) {
    use StickyReason as R;
    let unknown = |r| Some(Refusal::sticky(Class::SessionUnknown, r));
    let expected_refusal = if !ours {
        Some(Refusal::plain(Class::NotFound))
    } else if !matches!(transport, Some("polling" | "websocket")) {
        Some(Refusal::plain(Class::BadRequest))
    } else {
        match sid {
            Sid::None if none_up => Some(Refusal::plain(Class::NoWorker)),
            Sid::Malformed => unknown(R::Malformed),
            Sid::UnknownTag => unknown(R::UnknownWorker),
            Sid::OfDownWorker => unknown(R::WorkerDown),
            Sid::OfUpWorker if none_up => unknown(R::WorkerDown),
            Sid::None | Sid::OfUpWorker => None,
        }
    };
    assert_eq!(refusal(got), expected_refusal, "{case}");
    let Decision::Route(r) = got else { return };
    assert!(r.worker.is_up(), "{case}");
    let transport = Transport::parse(transport.unwrap()).unwrap();
    assert_eq!(r.transport, transport, "{case}");
    // A polling request with upgrade headers is proxied as polling.
    let carry = match (upgrade && transport == Transport::WebSocket, handoff) {
        (false, _) => Carry::Proxy,
        (true, true) => Carry::HandOff,
        (true, false) => Carry::Relay,
    };
    assert_eq!(r.carry, carry, "{case}");
    match sid {
        Sid::OfUpWorker => {
            assert_eq!(r.worker.label(), "w1", "{case}");
            let Session::Existing { target } = &r.session else {
                panic!("{case}: not an existing session")
            };
            assert!(
                target.ends_with("&sid=AAAAAAAAAAAAAAAA"),
                "{case}: {target}"
            );
            assert_eq!(r.tag_answer(), None, "{case}");
        }
        _ => {
            assert_eq!(r.session, Session::New, "{case}");
            // A polling handshake's answer is tagged, upgrade headers or not.
            let tagged = transport == Transport::Polling;
            assert_eq!(r.tag_answer(), tagged.then(|| r.worker.tag()), "{case}");
        }
    }
}

#[test]
fn head_size_is_checked_before_anything_else() {
    let fleet = fleet(false);
    let mut req = request("/elsewhere", None, false);
    req.head_bytes = 16 * 1024 + 1;
    assert_eq!(
        refusal(&router(true).route(&req, &fleet)),
        Some(Refusal::plain(Class::HeaderTooLarge))
    );
    req.head_bytes = 16 * 1024;
    assert_eq!(
        refusal(&router(true).route(&req, &fleet)),
        Some(Refusal::plain(Class::NotFound))
    );
}

#[test]
fn an_unreadable_query_is_a_malformed_bad_request() {
    let fleet = fleet(false);
    for query in ["transport=polling&sid=a&sid=b", "transport=polling&sid=%zz"] {
        let req = request("/socket.io/", Some(query), false);
        assert_eq!(
            refusal(&router(true).route(&req, &fleet)),
            Some(Refusal::sticky(Class::BadRequest, StickyReason::Malformed)),
            "{query}"
        );
    }
}

#[test]
fn the_sid_is_untagged_and_every_other_parameter_kept_byte_for_byte() {
    let fleet = fleet(false);
    let tagged = TaggedSid::encode(fleet.workers()[0].tag(), "abcDEF123_-");
    let query = format!("EIO=4&t=P%20x&transport=polling&sid={tagged}&j=1");
    let r = route(router(true).route(&request("/socket.io/", Some(&query), false), &fleet));
    assert_eq!(
        r.session,
        Session::Existing {
            target: "/socket.io/?EIO=4&t=P%20x&transport=polling&sid=abcDEF123_-&j=1".into()
        }
    );
}

#[test]
fn new_sessions_from_one_address_stick_while_loads_are_even() {
    let fleet = fleet(false);
    let req = request("/socket.io/", Some("EIO=4&transport=polling"), false);
    let first = route(router(true).route(&req, &fleet)).worker;
    for nonce in 0..20 {
        let again = route(router(true).route(&Request { nonce, ..req }, &fleet)).worker;
        assert!(Arc::ptr_eq(&first, &again));
    }
}

proptest! {
    /// Whatever arrives, routing answers, and never sends anything to a worker that is down
    /// or a session to a worker other than the one its tag names.
    #[test]
    fn any_request_is_answered_consistently(
        path in prop_oneof![Just("/socket.io/".to_owned()), "/[a-z./]{0,20}"],
        query in "[A-Za-z0-9=&%._-]{0,80}",
        sid_of in proptest::option::of(0usize..3),
        upgrade in any::<bool>(),
        none_up in any::<bool>(),
        nonce in any::<u64>(),
    ) {
        let fleet = fleet(none_up);
        let mut query = query;
        if let Some(i) = sid_of {
            query.push_str("&sid=");
            query.push_str(&TaggedSid::encode(fleet.workers()[i].tag(), "AAAA"));
        }
        let req = Request { nonce, ..request(&path, Some(&query), upgrade) };
        match router(true).route(&req, &fleet) {
            Decision::Refuse(r) => {
                let (status, _) = r.class.response();
                prop_assert!((400..600).contains(&status));
                prop_assert!(r.class != Class::UpstreamFailed);
            }
            Decision::Preflight => prop_assert!(false, "no OPTIONS was sent"),
            Decision::Route(r) => {
                prop_assert!(r.worker.is_up());
                if let Session::Existing { target } = &r.session {
                    prop_assert!(target.starts_with(path.as_str()));
                    // A sid in the random part would make it a repeated sid, refused: this
                    // session is the one appended, and the worker gets it untagged.
                    let i = sid_of.expect("only an appended sid names a worker");
                    prop_assert!(Arc::ptr_eq(&r.worker, &fleet.workers()[i]));
                    let tag = format!("{}.", r.worker.tag());
                    prop_assert!(!target.contains(&tag));
                }
            }
        }
    }
}

#[test]
fn with_no_worker_up_a_worker_that_answers_takes_new_sessions_and_keeps_its_own() {
    let fleet = fleet(true);
    let router = router(true);
    let query = "EIO=4&transport=polling";
    let req = request("/socket.io/", Some(query), false);
    assert_eq!(
        refusal(&router.route(&req, &fleet)),
        Some(Refusal::plain(Class::NoWorker)),
        "nobody answers: refused"
    );
    fleet.workers()[2].set_answers(true);
    let r = route(router.route(&req, &fleet));
    assert!(r.panic && Arc::ptr_eq(&r.worker, &fleet.workers()[2]));
    assert_eq!(r.tag_answer(), Some(fleet.workers()[2].tag()));
    let tagged = TaggedSid::encode(fleet.workers()[2].tag(), "AAAA");
    let query = format!("EIO=4&transport=polling&sid={tagged}");
    let r = route(router.route(&request("/socket.io/", Some(&query), false), &fleet));
    assert!(r.panic && Arc::ptr_eq(&r.worker, &fleet.workers()[2]));
    // A silent worker's sessions stay refused; so do all once one worker is up again.
    let silent = TaggedSid::encode(fleet.workers()[0].tag(), "AAAA");
    let query = format!("EIO=4&transport=polling&sid={silent}");
    assert_eq!(
        refusal(&router.route(&request("/socket.io/", Some(&query), false), &fleet)),
        Some(Refusal::sticky(
            Class::SessionUnknown,
            StickyReason::WorkerDown
        ))
    );
    fleet.workers()[1].set_up(true);
    let query = format!("EIO=4&transport=polling&sid={tagged}");
    assert_eq!(
        refusal(&router.route(&request("/socket.io/", Some(&query), false), &fleet)),
        Some(Refusal::sticky(
            Class::SessionUnknown,
            StickyReason::WorkerDown
        ))
    );
}

fn cors_router(origins: &[&str]) -> Router {
    let mut cfg = FleetConfig::default();
    cfg.socketio.cors.origins = origins.iter().map(|o| (*o).to_owned()).collect();
    Router::new(&cfg)
}

#[test]
fn a_preflight_is_answered_here_whatever_its_sid_and_never_placed() {
    let fleet = fleet(true); // no worker up: anything placed would be refused
    let down = TaggedSid::encode(fleet.workers()[2].tag(), "AAAA");
    for router in [router(true), cors_router(&["http://app.test"])] {
        for query in [
            None,
            Some("EIO=4&transport=polling".to_owned()),
            Some(format!("EIO=4&transport=polling&sid={down}")),
            Some("%zz".to_owned()),
        ] {
            let req = Request {
                preflight: true,
                origin: Some(b"http://app.test"),
                ..request("/socket.io/", query.as_deref(), false)
            };
            assert!(
                matches!(router.route(&req, &fleet), Decision::Preflight),
                "{query:?}"
            );
        }
        let outside = Request {
            preflight: true,
            ..request("/other", None, false)
        };
        assert_eq!(
            refusal(&router.route(&outside, &fleet)),
            Some(Refusal::plain(Class::NotFound))
        );
    }
}

#[test]
fn listed_origins_gate_handshakes_and_upgrades_only() {
    let fleet = fleet(false);
    let listed = cors_router(&["http://app.test"]);
    let sid = TaggedSid::encode(fleet.workers()[0].tag(), "AAAA");
    let polling = "EIO=4&transport=polling".to_owned();
    let with_sid = format!("EIO=4&transport=polling&sid={sid}");
    let ws_sid = format!("EIO=4&transport=websocket&sid={sid}");
    let ws_new = "EIO=4&transport=websocket".to_owned();
    let forbidden = Some(Refusal::plain(Class::Forbidden));
    for (query, upgrade, origin, refused) in [
        (&polling, false, Some(&b"http://app.test"[..]), None),
        (&polling, false, None, None),
        (&polling, false, Some(b"http://evil.test"), forbidden),
        (&ws_new, true, Some(b"http://evil.test"), forbidden),
        (&ws_new, true, Some(b"http://app.test"), None),
        (&ws_sid, true, Some(b"http://evil.test"), forbidden),
        (&ws_sid, true, None, None),
        // A polling request of an open session: the browser will not let the page read the
        // answer; the worker holds the session anyway.
        (&with_sid, false, Some(b"http://evil.test"), None),
    ] {
        let req = Request {
            origin,
            ..request("/socket.io/", Some(query), upgrade)
        };
        assert_eq!(
            refusal(&listed.route(&req, &fleet)),
            refused,
            "{query} {origin:?}"
        );
    }
    // With no list (off, or "*"), every origin may open a session.
    for router in [router(true), cors_router(&["*"])] {
        let req = Request {
            origin: Some(b"http://evil.test"),
            ..request("/socket.io/", Some(&ws_new), true)
        };
        assert_eq!(refusal(&router.route(&req, &fleet)), None);
    }
}

#[test]
fn forwarded_paths_reach_a_ready_worker_and_private_ones_never_do() {
    let fleet = fleet(false);
    let mut cfg = FleetConfig::default();
    cfg.balancer.forward_paths = vec!["/".into()];
    let forwarding = Router::new(&cfg);
    for path in ["/", "/index.html", "/static/app.js", "/metricsx"] {
        let r = route(forwarding.route(&request(path, None, false), &fleet));
        assert_eq!(
            (r.session.clone(), r.transport),
            (Session::Page, Transport::Http),
            "{path}"
        );
        assert!(r.worker.is_up() && r.tag_answer().is_none());
    }
    let not_found = Some(Refusal::plain(Class::NotFound));
    for path in [
        "/metrics",
        "/healthz",
        "/readyz",
        "/api/info",
        "/api",
        "/api/publish",
    ] {
        let got = forwarding.route(&request(path, None, false), &fleet);
        assert_eq!(refusal(&got), not_found, "{path}");
    }
    // Not an upgrade, and nothing without the setting.
    assert_eq!(
        refusal(&forwarding.route(&request("/ws", None, true), &fleet)),
        not_found
    );
    assert_eq!(
        refusal(&router(true).route(&request("/", None, false), &fleet)),
        not_found
    );
}
