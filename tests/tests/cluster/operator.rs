//! Cluster tests of the operator: see issue 3.
