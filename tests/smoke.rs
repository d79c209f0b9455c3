//! Basic behaviour through the public API: append, read, ack, reopen.
use std::sync::Arc;
use std::time::Duration;

use cinder::{FileKeyProvider, Options, Store};

#[test]
fn append_read_ack_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
    let dir = tmp.path().join("data");
    let ttl = Duration::from_secs(3600);
    let (a, b);
    {
        let s = Store::open(&dir, Options::new(key.clone())).unwrap();
        a = s.append(b"alice", b"one", ttl).unwrap();
        b = s.append(b"alice", b"two", ttl).unwrap();
        s.append(b"bob", b"three", ttl).unwrap();
        let page = s.read(b"alice", None, 10).unwrap();
        assert_eq!(
            page.iter()
                .map(|m| m.payload.as_slice())
                .collect::<Vec<_>>(),
            vec![&b"one"[..], b"two"]
        );
        assert!(s.ack(b"alice", a).unwrap());
        assert!(!s.ack(b"alice", a).unwrap());
        assert!(!s.ack(b"bob", b).unwrap(), "ack is scoped to its queue");
        assert_eq!(s.len(b"alice").unwrap(), 1);
    }
    let s = Store::open(&dir, Options::new(key)).unwrap();
    let page = s.read(b"alice", None, 10).unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].id, b);
    assert_eq!(page[0].payload, b"two");
    assert_eq!(s.read(b"bob", None, 10).unwrap().len(), 1);
}
