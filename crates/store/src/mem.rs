//! The `--in-memory` backend: the records in an ordered map of this process. Nothing survives the
//! process, so nothing syncs; a commit is the map's update (SQLite's in-memory database did the
//! same job through its B-tree and transaction machinery, a few µs per change).

use crate::{Backend, Op, Result, StoreError};
use std::collections::BTreeMap;
use std::ops::Bound;

#[derive(Default)]
pub struct MemBackend {
    records: BTreeMap<String, Vec<u8>>,
}

impl MemBackend {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Backend for MemBackend {
    fn load_all(&mut self) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(self
            .records
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn commit(&mut self, ops: &[Op]) -> Result<()> {
        // All or nothing: the one way a commit can fail is checked before anything changes.
        if let Some(prefix) = ops.iter().find_map(|op| match op {
            Op::DeletePrefix { prefix } if !prefix.ends_with('/') => Some(prefix),
            _ => None,
        }) {
            return Err(StoreError(format!("prefix {prefix:?} must end with '/'")));
        }
        for op in ops {
            match op {
                Op::Put { key, value } => {
                    self.records.insert(key.clone(), value.clone());
                }
                Op::Delete { key } => {
                    self.records.remove(key);
                }
                Op::DeletePrefix { prefix } => {
                    let from = (Bound::Included(prefix.as_str()), Bound::Unbounded);
                    let doomed: Vec<String> = self
                        .records
                        .range::<str, _>(from)
                        .take_while(|(k, _)| k.starts_with(prefix.as_str()))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in doomed {
                        self.records.remove(&k);
                    }
                }
            }
        }
        Ok(())
    }

    fn syncs(&self) -> bool {
        false
    }
}
