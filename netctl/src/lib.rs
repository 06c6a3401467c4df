//! netctl: container networking in the model of Docker's libnetwork (networks, endpoints,
//! sandboxes, built-in IPAM), with the data plane in eBPF programs loaded with aya.
//!
//! Layout, one module per concern:
//! - [`model`]: desired state and the validation of every change (pure).
//! - [`ipam`]: address and subnet allocation (pure).
//! - [`store`]: the embedded transactional store (redb) that holds the desired state.
//! - [`netlink`]: everything rtnetlink (bridges, veths, addresses, routes, namespaces).
//! - [`datapath`]: everything aya (the loaded object, pinned maps, programs and links).
//! - [`reconcile`]: turns desired state into kernel state, idempotently.
//! - [`agent`] and [`api`]: the node agent and its HTTP/JSON API on a unix socket.
//! - [`client`] and [`cli`]: the `netctl` command line.
pub mod agent;
pub mod api;
pub mod cli;
pub mod client;
pub mod datapath;
pub mod dns;
pub mod docker;
pub mod ipam;
pub mod maglev;
pub mod model;
pub mod netlink;
pub mod reconcile;
pub mod store;
