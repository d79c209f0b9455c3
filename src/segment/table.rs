//! The registry of live segments, by id.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use super::Segment;

/// Every segment that still has a key: active, closed, or waiting to be shredded.
#[derive(Debug, Default)]
pub struct SegmentTable {
    map: RwLock<HashMap<u64, Arc<Segment>>>,
}

impl SegmentTable {
    pub fn get(&self, id: u64) -> Option<Arc<Segment>> {
        self.map.read().get(&id).cloned()
    }

    pub fn insert(&self, seg: Arc<Segment>) {
        self.map.write().insert(seg.id, seg);
    }

    pub fn remove(&self, id: u64) -> Option<Arc<Segment>> {
        self.map.write().remove(&id)
    }

    pub fn all(&self) -> Vec<Arc<Segment>> {
        let mut v: Vec<_> = self.map.read().values().cloned().collect();
        v.sort_by_key(|s| s.id);
        v
    }
}
