//! podfs test network.
