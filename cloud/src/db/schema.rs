//! The Diesel schema shared by both backends.
