//! Kubernetes: the custom resources, the kube cluster source (watchers and
//! reflectors over Services, EndpointSlices, ServiceExports and Links) and
//! the mirror writer (ServiceImports, clusterset and per-cluster mirror
//! Services, EndpointSlices; server-side apply under one Lease).

pub mod crd;
