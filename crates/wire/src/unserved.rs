//! The Batch data-plane operations of the published API that bluebatch does not serve, as one
//! table. A request for one of them answers 501 `NotImplemented` naming the operation (see
//! [`not_served`]) instead of 400 `InvalidUri`, so a user learns that the call is right and the
//! emulator does not do it; a path that names nothing in the published API stays `InvalidUri`.
//!
//! Sources: the URL templates of azure-batch 15.1 (`2025-06-01`) and of azure-batch 15.0.0b1
//! (`2024-02-01.19.0`, bundled in the az CLI), and the paths older api-versions published and
//! later dropped (certificates, lifetime statistics, node agent SKUs, remote desktop, pool OS
//! upgrade). Operation names are the REST operationIds of Azure's OpenAPI files.

use axum::http::Method;
use bluebatch_core::error::{BatchError, Code};

/// (method, path template, operationId). In a template, `{name}` stands for any non-empty part of
/// one segment; a final `{filePath}` stands for one or more segments (file paths sent with their
/// slashes unescaped). Literal parts compare case-insensitively, as the served routes do.
pub const PUBLISHED_NOT_SERVED: &[(&str, &str, &str)] = &[
    // Account
    ("GET", "/applications", "Application_List"),
    ("GET", "/applications/{applicationId}", "Application_Get"),
    ("GET", "/supportedimages", "Account_ListSupportedImages"),
    ("GET", "/nodeagentskus", "Account_ListNodeAgentSkus"),
    ("GET", "/nodecounts", "Account_ListPoolNodeCounts"),
    ("GET", "/poolusagemetrics", "Pool_ListUsageMetrics"),
    ("GET", "/lifetimepoolstats", "Pool_GetAllLifetimeStatistics"),
    ("GET", "/lifetimejobstats", "Job_GetAllLifetimeStatistics"),
    // Certificates (api-versions up to 2024-02-01.19.0)
    ("POST", "/certificates", "Certificate_Add"),
    ("GET", "/certificates", "Certificate_List"),
    (
        "GET",
        "/certificates(thumbprintAlgorithm={thumbprintAlgorithm},thumbprint={thumbprint})",
        "Certificate_Get",
    ),
    (
        "DELETE",
        "/certificates(thumbprintAlgorithm={thumbprintAlgorithm},thumbprint={thumbprint})",
        "Certificate_Delete",
    ),
    (
        "POST",
        "/certificates(thumbprintAlgorithm={thumbprintAlgorithm},thumbprint={thumbprint})/canceldelete",
        "Certificate_CancelDeletion",
    ),
    // Pools (beyond Add, List, Get, Exists, Delete, Resize, Remove Nodes)
    ("PATCH", "/pools/{poolId}", "Pool_Patch"),
    (
        "POST",
        "/pools/{poolId}/updateproperties",
        "Pool_UpdateProperties",
    ),
    (
        "POST",
        "/pools/{poolId}/enableautoscale",
        "Pool_EnableAutoScale",
    ),
    (
        "POST",
        "/pools/{poolId}/disableautoscale",
        "Pool_DisableAutoScale",
    ),
    (
        "POST",
        "/pools/{poolId}/evaluateautoscale",
        "Pool_EvaluateAutoScale",
    ),
    ("POST", "/pools/{poolId}/stopresize", "Pool_StopResize"),
    ("POST", "/pools/{poolId}/upgradeos", "Pool_UpgradeOS"),
    // Compute nodes (beyond the served ones)
    (
        "GET",
        "/pools/{poolId}/nodes/{nodeId}/rdp",
        "ComputeNode_GetRemoteDesktop",
    ),
    (
        "POST",
        "/pools/{poolId}/nodes/{nodeId}/uploadbatchservicelogs",
        "ComputeNode_UploadBatchServiceLogs",
    ),
    (
        "POST",
        "/pools/{poolId}/nodes/{nodeId}/start",
        "ComputeNode_Start",
    ),
    (
        "POST",
        "/pools/{poolId}/nodes/{nodeId}/deallocate",
        "ComputeNode_Deallocate",
    ),
    (
        "GET",
        "/pools/{poolId}/nodes/{nodeId}/extensions",
        "ComputeNodeExtension_List",
    ),
    (
        "GET",
        "/pools/{poolId}/nodes/{nodeId}/extensions/{extensionName}",
        "ComputeNodeExtension_Get",
    ),
    // Files on nodes
    (
        "GET",
        "/pools/{poolId}/nodes/{nodeId}/files",
        "File_ListFromComputeNode",
    ),
    (
        "GET",
        "/pools/{poolId}/nodes/{nodeId}/files/{filePath}",
        "File_GetFromComputeNode",
    ),
    (
        "HEAD",
        "/pools/{poolId}/nodes/{nodeId}/files/{filePath}",
        "File_GetPropertiesFromComputeNode",
    ),
    (
        "DELETE",
        "/pools/{poolId}/nodes/{nodeId}/files/{filePath}",
        "File_DeleteFromComputeNode",
    ),
    // Jobs
    ("POST", "/jobs", "Job_Add"),
    ("GET", "/jobs", "Job_List"),
    ("GET", "/jobs/{jobId}", "Job_Get"),
    ("PATCH", "/jobs/{jobId}", "Job_Patch"),
    ("PUT", "/jobs/{jobId}", "Job_Update"),
    ("DELETE", "/jobs/{jobId}", "Job_Delete"),
    ("POST", "/jobs/{jobId}/disable", "Job_Disable"),
    ("POST", "/jobs/{jobId}/enable", "Job_Enable"),
    ("POST", "/jobs/{jobId}/terminate", "Job_Terminate"),
    (
        "GET",
        "/jobs/{jobId}/jobpreparationandreleasetaskstatus",
        "Job_ListPreparationAndReleaseTaskStatus",
    ),
    ("GET", "/jobs/{jobId}/taskcounts", "Job_GetTaskCounts"),
    // Tasks
    ("POST", "/jobs/{jobId}/tasks", "Task_Add"),
    ("GET", "/jobs/{jobId}/tasks", "Task_List"),
    (
        "POST",
        "/jobs/{jobId}/addtaskcollection",
        "Task_AddCollection",
    ),
    ("GET", "/jobs/{jobId}/tasks/{taskId}", "Task_Get"),
    ("PUT", "/jobs/{jobId}/tasks/{taskId}", "Task_Update"),
    ("DELETE", "/jobs/{jobId}/tasks/{taskId}", "Task_Delete"),
    (
        "GET",
        "/jobs/{jobId}/tasks/{taskId}/subtasksinfo",
        "Task_ListSubtasks",
    ),
    (
        "POST",
        "/jobs/{jobId}/tasks/{taskId}/terminate",
        "Task_Terminate",
    ),
    (
        "POST",
        "/jobs/{jobId}/tasks/{taskId}/reactivate",
        "Task_Reactivate",
    ),
    // Files of tasks
    (
        "GET",
        "/jobs/{jobId}/tasks/{taskId}/files",
        "File_ListFromTask",
    ),
    (
        "GET",
        "/jobs/{jobId}/tasks/{taskId}/files/{filePath}",
        "File_GetFromTask",
    ),
    (
        "HEAD",
        "/jobs/{jobId}/tasks/{taskId}/files/{filePath}",
        "File_GetPropertiesFromTask",
    ),
    (
        "DELETE",
        "/jobs/{jobId}/tasks/{taskId}/files/{filePath}",
        "File_DeleteFromTask",
    ),
    // Job schedules
    ("POST", "/jobschedules", "JobSchedule_Add"),
    ("GET", "/jobschedules", "JobSchedule_List"),
    ("GET", "/jobschedules/{jobScheduleId}", "JobSchedule_Get"),
    (
        "HEAD",
        "/jobschedules/{jobScheduleId}",
        "JobSchedule_Exists",
    ),
    (
        "PATCH",
        "/jobschedules/{jobScheduleId}",
        "JobSchedule_Patch",
    ),
    ("PUT", "/jobschedules/{jobScheduleId}", "JobSchedule_Update"),
    (
        "DELETE",
        "/jobschedules/{jobScheduleId}",
        "JobSchedule_Delete",
    ),
    (
        "POST",
        "/jobschedules/{jobScheduleId}/disable",
        "JobSchedule_Disable",
    ),
    (
        "POST",
        "/jobschedules/{jobScheduleId}/enable",
        "JobSchedule_Enable",
    ),
    (
        "POST",
        "/jobschedules/{jobScheduleId}/terminate",
        "JobSchedule_Terminate",
    ),
    (
        "GET",
        "/jobschedules/{jobScheduleId}/jobs",
        "Job_ListFromJobSchedule",
    ),
];

/// What the table says about a request's path and method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// A published operation bluebatch does not serve.
    Operation(&'static str),
    /// A published path, but no published operation has this method on it.
    OtherMethod,
    /// No published, unserved path has this shape.
    Unknown,
}

/// Looks a request up in [`PUBLISHED_NOT_SERVED`]; `segments` are the decoded path segments.
pub fn lookup(method: &Method, segments: &[String]) -> Lookup {
    let mut path_known = false;
    for (m, template, operation) in PUBLISHED_NOT_SERVED {
        if path_matches(template, segments) {
            if method.as_str() == *m {
                return Lookup::Operation(operation);
            }
            path_known = true;
        }
    }
    if path_known {
        Lookup::OtherMethod
    } else {
        Lookup::Unknown
    }
}

/// The 501 answer for an operation of the published API that bluebatch does not serve.
pub fn not_served(operation: &str) -> BatchError {
    BatchError::new(Code::NotImplemented)
        .message(format!(
            "The operation {operation} is part of the Azure Batch API, but bluebatch does not \
             serve it: bluebatch serves pools, compute nodes and node users."
        ))
        .with("Operation", operation)
}

fn path_matches(template: &str, segments: &[String]) -> bool {
    let parts: Vec<&str> = template.trim_start_matches('/').split('/').collect();
    let tail = parts.last() == Some(&"{filePath}");
    let fixed = if tail { parts.len() - 1 } else { parts.len() };
    if tail {
        if segments.len() <= fixed {
            return false;
        }
    } else if segments.len() != fixed {
        return false;
    }
    parts[..fixed]
        .iter()
        .zip(segments)
        .all(|(p, s)| segment_matches(p, s))
}

/// One template segment against one path segment: literal text (any case) around `{…}`
/// placeholders, each of which takes at least one character.
fn segment_matches(template: &str, segment: &str) -> bool {
    match template.find('{') {
        None => template.eq_ignore_ascii_case(segment),
        Some(open) => {
            let Some(close) = template[open..].find('}').map(|c| open + c) else {
                return false;
            };
            let (literal, rest) = (&template[..open], &template[close + 1..]);
            let Some(head) = segment.get(..literal.len()) else {
                return false;
            };
            if !head.eq_ignore_ascii_case(literal) {
                return false;
            }
            let after = &segment[literal.len()..];
            // The placeholder takes 1..n characters; the rest of the template the remainder.
            (1..=after.len())
                .filter(|&n| after.is_char_boundary(n))
                .any(|n| segment_matches(rest, &after[n..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(p: &str) -> Vec<String> {
        crate::endpoint::route_segments(p).unwrap()
    }

    #[test]
    fn finds_operations_by_method_and_path() {
        let l = |m: Method, p: &str| lookup(&m, &segs(p));
        assert_eq!(l(Method::POST, "/jobs"), Lookup::Operation("Job_Add"));
        assert_eq!(
            l(Method::GET, "/JOBS/j1/Tasks"),
            Lookup::Operation("Task_List")
        );
        assert_eq!(
            l(Method::GET, "/pools/p/nodes/n/files/wd/out/stdout.txt"),
            Lookup::Operation("File_GetFromComputeNode")
        );
        assert_eq!(
            l(Method::HEAD, "/jobs/j/tasks/t/files/stderr.txt"),
            Lookup::Operation("File_GetPropertiesFromTask")
        );
        assert_eq!(
            l(
                Method::GET,
                "/certificates(thumbprintAlgorithm=sha1,thumbprint=0123abc)"
            ),
            Lookup::Operation("Certificate_Get")
        );
        assert_eq!(
            l(
                Method::POST,
                "/certificates(thumbprintalgorithm=sha1,thumbprint=0123abc)/canceldelete"
            ),
            Lookup::Operation("Certificate_CancelDeletion")
        );
        assert_eq!(
            l(Method::PATCH, "/pools/p"),
            Lookup::Operation("Pool_Patch")
        );
        assert_eq!(l(Method::PUT, "/jobs"), Lookup::OtherMethod);
        assert_eq!(l(Method::GET, "/jobs/j/disable"), Lookup::OtherMethod);
        assert_eq!(l(Method::GET, "/nonsense"), Lookup::Unknown);
        assert_eq!(l(Method::GET, "/jobs/j/tasks/t/bogus"), Lookup::Unknown);
        assert_eq!(
            l(Method::GET, "/pools/p/nodes/n/files/"),
            Lookup::Operation("File_ListFromComputeNode")
        );
        assert_eq!(l(Method::GET, "/certificates()"), Lookup::Unknown);
        assert_eq!(
            l(
                Method::GET,
                "/certificates(thumbprintAlgorithm=,thumbprint=x)"
            ),
            Lookup::Unknown
        );
    }

    #[test]
    fn every_row_is_well_formed_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for (m, t, op) in PUBLISHED_NOT_SERVED {
            assert!(Method::from_bytes(m.as_bytes()).is_ok(), "{m}");
            assert!(t.starts_with('/') && !t.ends_with('/'), "{t}");
            assert!(op.contains('_'), "{op}");
            assert!(seen.insert((m, t.to_ascii_lowercase())), "{m} {t} twice");
        }
    }
}
