//! Recently used root-key versions, kept unwrapped in the HSM as non-extractable session
//! objects, so that WrapKey/UnwrapKey do not pay a C_UnwrapKey on every call.
//!
//! - Bounded: an LRU per shard; shards keep concurrent callers off one lock, and a lock
//!   is held only for a map operation, never across a PKCS#11 call.
//! - Safe destruction: entries are `Arc<CachedKey>`. Evicting or invalidating an entry
//!   only drops the map's reference; the object is destroyed when the last user drops
//!   its reference, by queueing the handle for the next PKCS#11 job to destroy. So no
//!   call ever uses a handle that another thread has just destroyed.
//! - Generations: each entry remembers the module generation it was made in (see
//!   [`super::link`]). After a re-initialisation the old objects are gone and their
//!   handle numbers may name new objects, so they are forgotten, never destroyed.

use std::hash::BuildHasher;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use lru::LruCache;
use uuid::Uuid;

const SHARDS: usize = 16;

/// Identifies one version of one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VersionId {
    pub key_id: Uuid,
    pub version_id: Uuid,
}

/// An unwrapped key version living in the HSM. Destroyed (deferred) on last drop.
pub(crate) struct CachedKey {
    pub(crate) handle: ObjectHandle,
    generation: u64,
    graveyard: Arc<Graveyard>,
}

impl Drop for CachedKey {
    fn drop(&mut self) {
        self.graveyard.bury(self.generation, self.handle);
    }
}

/// Handles waiting to be destroyed by whichever PKCS#11 job runs next.
#[derive(Default)]
pub(crate) struct Graveyard {
    handles: Mutex<Vec<(u64, ObjectHandle)>>,
}

impl Graveyard {
    fn bury(&self, generation: u64, handle: ObjectHandle) {
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((generation, handle));
    }

    /// Destroys every queued object of `generation`; those of earlier generations died
    /// with C_Finalize and are only forgotten. Blocking; failures are logged, not
    /// returned (an object already gone with its session needs no destroying).
    pub(crate) fn destroy_all(&self, session: &Session, generation: u64) {
        let handles = {
            let mut queued = self.handles.lock().unwrap_or_else(|e| e.into_inner());
            if queued.is_empty() {
                return;
            }
            std::mem::take(&mut *queued)
        };
        for (made_in, handle) in handles {
            if made_in != generation {
                continue;
            }
            if let Err(e) = session.destroy_object(handle) {
                tracing::debug!(error = %e, "destroying an evicted key object");
            }
        }
    }
}

pub(crate) struct KeyCache {
    shards: Vec<Mutex<LruCache<VersionId, Arc<CachedKey>>>>,
    hasher: std::collections::hash_map::RandomState,
    generation: AtomicU64,
    pub(crate) graveyard: Arc<Graveyard>,
}

impl KeyCache {
    pub(crate) fn new(capacity: usize) -> Self {
        let per_shard = NonZeroUsize::new(capacity.div_ceil(SHARDS).max(1)).expect("non-zero");
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LruCache::new(per_shard)))
                .collect(),
            hasher: Default::default(),
            generation: AtomicU64::new(1),
            graveyard: Arc::default(),
        }
    }

    /// Objects unwrapped from now on belong to this module generation.
    pub(crate) fn set_generation(&self, generation: u64) {
        self.generation.store(generation, Ordering::Release);
    }

    fn shard(&self, key_id: &Uuid) -> &Mutex<LruCache<VersionId, Arc<CachedKey>>> {
        &self.shards[self.hasher.hash_one(key_id) as usize % SHARDS]
    }

    pub(crate) fn get(&self, id: &VersionId) -> Option<Arc<CachedKey>> {
        self.shard(&id.key_id)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Caches a freshly unwrapped object and returns the shared entry for it.
    pub(crate) fn insert(&self, id: VersionId, handle: ObjectHandle) -> Arc<CachedKey> {
        let entry = Arc::new(CachedKey {
            handle,
            generation: self.generation.load(Ordering::Acquire),
            graveyard: Arc::clone(&self.graveyard),
        });
        // A replaced or evicted entry is dropped here, outside the lock, which queues
        // its object for destruction once nobody uses it.
        let _displaced = self
            .shard(&id.key_id)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id, Arc::clone(&entry));
        entry
    }

    /// Forgets every cached version of a key (rotation, disable, delete).
    pub(crate) fn invalidate_key(&self, key_id: &Uuid) {
        let removed: Vec<Arc<CachedKey>> = {
            let mut shard = self.shard(key_id).lock().unwrap_or_else(|e| e.into_inner());
            let ids: Vec<VersionId> = shard
                .iter()
                .filter(|(id, _)| id.key_id == *key_id)
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| shard.pop(id)).collect()
        };
        drop(removed);
    }

    /// Forgets everything (a pooled session died, or shutdown).
    pub(crate) fn clear(&self) {
        for shard in &self.shards {
            let drained: Vec<_> = {
                let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
                let mut all = Vec::with_capacity(shard.len());
                while let Some(entry) = shard.pop_lru() {
                    all.push(entry);
                }
                all
            };
            drop(drained);
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(key: Uuid) -> VersionId {
        VersionId {
            key_id: key,
            version_id: Uuid::new_v4(),
        }
    }

    fn handle(raw: u64) -> ObjectHandle {
        // SAFETY: these handles are never passed to a PKCS#11 function.
        unsafe { ObjectHandle::new_from_raw(raw as _) }
    }

    fn buried(cache: &KeyCache) -> usize {
        cache.graveyard.handles.lock().unwrap().len()
    }

    #[test]
    fn entries_in_use_are_destroyed_only_after_their_last_user_drops_them() {
        let cache = KeyCache::new(SHARDS);
        let key = Uuid::new_v4();
        let v = id(key);
        let entry = cache.insert(v, handle(7));
        cache.invalidate_key(&key);
        assert!(cache.get(&v).is_none());
        assert_eq!(buried(&cache), 0, "still in use: not destroyed yet");
        drop(entry);
        assert_eq!(buried(&cache), 1);
    }

    #[test]
    fn the_cache_is_bounded_and_evicts_to_the_graveyard() {
        let cache = KeyCache::new(SHARDS * 2);
        for raw in 0..(SHARDS as u64 * 10) {
            drop(cache.insert(id(Uuid::new_v4()), handle(raw)));
        }
        assert!(cache.len() <= SHARDS * 2);
        assert_eq!(cache.len() + buried(&cache), SHARDS * 10);
        cache.clear();
        assert_eq!(cache.len(), 0);
        assert_eq!(buried(&cache), SHARDS * 10);
    }
}
