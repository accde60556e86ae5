//! The two peers of a session and the two directions of its relay: the vocabulary every
//! part of the engine (the session core, shaping, capture, the drivers) speaks of them in.

/// One of the two peers of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }
}

/// A direction of relay, named by where its bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// client -> backend
    Up,
    /// backend -> client
    Down,
}

impl Direction {
    /// The peer this direction reads from.
    pub fn source(self) -> Side {
        match self {
            Direction::Up => Side::Client,
            Direction::Down => Side::Backend,
        }
    }

    /// The direction that reads from `side`.
    pub fn from_source(side: Side) -> Direction {
        match side {
            Side::Client => Direction::Up,
            Side::Backend => Direction::Down,
        }
    }
}
