//! Shared service runtime (work in progress).
