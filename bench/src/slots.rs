//! Reusable slots addressed by index; the index doubles as a mio token.
//!
//! A removed slot's index is handed out again by the next insert, so tokens stay small and
//! event loops never allocate per connection beyond the connection itself. A late event for
//! a reused index reaches the new occupant; every session tolerates spurious wake-ups.

/// A vector of optional values with a free list.
#[derive(Debug)]
pub struct Slots<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Self { items: Vec::new(), free: Vec::new() }
    }
}

impl<T> Slots<T> {
    /// Index the next [`Slots::insert`] will use.
    pub fn next_index(&self) -> usize {
        self.free.last().copied().unwrap_or(self.items.len())
    }

    /// Stores `value` and returns its index.
    pub fn insert(&mut self, value: T) -> usize {
        match self.free.pop() {
            Some(index) => {
                self.items[index] = Some(value);
                index
            }
            None => {
                self.items.push(Some(value));
                self.items.len() - 1
            }
        }
    }

    /// Takes the value out of `index`, freeing it for reuse.
    pub fn remove(&mut self, index: usize) -> Option<T> {
        let value = self.items.get_mut(index)?.take()?;
        self.free.push(index);
        Some(value)
    }

    /// The value at `index`, if occupied.
    pub fn get_mut(&mut self, index: usize) -> Option<&mut T> {
        self.items.get_mut(index)?.as_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_index_is_reused_and_old_value_gone() {
        let mut slots = Slots::default();
        let a = slots.insert("a");
        let b = slots.insert("b");
        assert_eq!((a, b), (0, 1));
        assert_eq!(slots.remove(a), Some("a"));
        assert_eq!(slots.remove(a), None, "double remove must not free twice");
        assert_eq!(slots.next_index(), a);
        let c = slots.insert("c");
        assert_eq!(c, a);
        assert_eq!(slots.get_mut(c), Some(&mut "c"));
        assert_eq!(slots.insert("d"), 2);
    }

    #[test]
    fn out_of_range_is_none() {
        let mut slots: Slots<u8> = Slots::default();
        assert!(slots.get_mut(7).is_none());
        assert!(slots.remove(7).is_none());
    }
}
