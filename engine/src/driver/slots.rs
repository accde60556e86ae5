//! A slab of sessions addressed by index, with a generation per slot so that a stale
//! timer or completion for a reused slot is recognised and ignored.

/// Index plus generation of a live entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotId {
    pub index: u32,
    pub gen: u32,
}

#[derive(Debug)]
pub struct Slots<T> {
    entries: Vec<(u32, Option<T>)>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Self { entries: Vec::new(), free: Vec::new(), len: 0 }
    }
}

impl<T> Slots<T> {
    pub fn insert(&mut self, value: T) -> SlotId {
        self.len += 1;
        if let Some(index) = self.free.pop() {
            let entry = &mut self.entries[index as usize];
            entry.0 = entry.0.wrapping_add(1);
            entry.1 = Some(value);
            return SlotId { index, gen: entry.0 };
        }
        let index = self.entries.len() as u32;
        self.entries.push((0, Some(value)));
        SlotId { index, gen: 0 }
    }

    pub fn get_mut(&mut self, id: SlotId) -> Option<&mut T> {
        match self.entries.get_mut(id.index as usize) {
            Some((gen, Some(v))) if *gen == id.gen => Some(v),
            _ => None,
        }
    }

    /// The live entry at `index`, whatever its generation.
    pub fn at_mut(&mut self, index: u32) -> Option<(SlotId, &mut T)> {
        match self.entries.get_mut(index as usize) {
            Some((gen, Some(v))) => Some((SlotId { index, gen: *gen }, v)),
            _ => None,
        }
    }

    pub fn remove(&mut self, id: SlotId) -> Option<T> {
        let entry = self.entries.get_mut(id.index as usize)?;
        if entry.0 != id.gen {
            return None;
        }
        let value = entry.1.take()?;
        self.free.push(id.index);
        self.len -= 1;
        Some(value)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Ids of every live entry.
    pub fn ids(&self) -> Vec<SlotId> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, (_, v))| v.is_some())
            .map(|(i, (gen, _))| SlotId { index: i as u32, gen: *gen })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_slot_rejects_the_old_id() {
        let mut slots = Slots::default();
        let a = slots.insert("a");
        assert_eq!(slots.remove(a), Some("a"));
        let b = slots.insert("b");
        assert_eq!(a.index, b.index);
        assert!(slots.get_mut(a).is_none());
        assert_eq!(slots.get_mut(b), Some(&mut "b"));
        assert_eq!(slots.remove(a), None);
        assert!(!slots.is_empty());
        assert_eq!(slots.ids(), vec![b]);
    }
}
