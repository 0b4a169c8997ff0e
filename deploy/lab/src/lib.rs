//! The native lab: starts and supervises the stack (work in progress).
