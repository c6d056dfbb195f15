//! One handler per Batch operation: turn the checked request into a service command and the
//! outcome into Azure's answer.

use crate::conditions::{Conditions, Failed};
use crate::dto::{self, NODE_FILTER_FIELDS, POOL_FILTER_FIELDS};
use crate::endpoint::Endpoint;
use crate::odata::{parse_filter, select};
use crate::percent::encode;
use crate::query::Query;
use crate::respond::{self, Ctx, empty, json_response, with_resource, with_written};
use crate::server::App;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Response, StatusCode};
use bluebatch_core::error::{BatchError, Code};
use bluebatch_core::model::{Pool, SchedulingState};
use bluebatch_core::pools::{
    DISABLE_SCHEDULING_OPTIONS, NODE_DEALLOCATION_OPTIONS, parse_add_pool, parse_node_option,
    parse_remove_nodes, parse_resize,
};
use bluebatch_core::users::{parse_add_user, parse_update_user};
use bluebatch_service::{NodeView, NodeWritten, PoolView, PoolWritten, UserAddr};
use serde_json::{Value, json};

type Answer = Result<Response<Body>, BatchError>;

/// Hashes off the async workers (SHA-512-crypt costs milliseconds); the console's user forms
/// hash through it too.
pub(crate) async fn hash(password: Option<&str>) -> Result<Option<String>, BatchError> {
    match password {
        None => Ok(None),
        Some(p) => match crate::hashing::hash_password(p.to_string()).await {
            Some(h) => Ok(Some(h)),
            None => Err(BatchError::new(Code::InternalError)),
        },
    }
}

fn next_link(ctx: &Ctx, path: &str, q: &Query, last: &str) -> String {
    let mut params: Vec<String> = q
        .for_next_link
        .iter()
        .map(|(n, v)| format!("{}={}", encode(n), encode(v)))
        .collect();
    params.push(format!("$skiptoken={}", encode(last)));
    format!("{}{path}?{}", ctx.base, params.join("&"))
}

pub async fn dispatch(
    app: &App,
    ctx: &Ctx,
    account: &str,
    endpoint: Endpoint,
    q: &Query,
    headers: &HeaderMap,
    body: Bytes,
) -> Answer {
    let svc = &app.service;
    let max_nodes = svc.config().max_nodes_per_pool;
    match endpoint {
        Endpoint::PoolAdd => {
            let new = parse_add_pool(&body, max_nodes)?;
            let w = svc.add_pool_written(account, new).await?;
            let url = dto::pool_url(&ctx.base, &w.pool_id);
            Ok(with_resource(
                empty(StatusCode::CREATED),
                &w.etag,
                w.last_modified,
                Some(&url),
            ))
        }
        Endpoint::PoolList => {
            let filter = q
                .filter
                .as_deref()
                .map(|f| parse_filter(f, POOL_FILTER_FIELDS))
                .transpose()?;
            let keep = |v: &PoolView| {
                filter
                    .as_ref()
                    .is_none_or(|f| f.eval(&|k| dto::pool_field(v, k)))
            };
            let (pools, more) = svc.list_pools(
                account,
                &keep,
                q.skip_token.as_deref(),
                q.max_results as usize,
            );
            list_answer(
                ctx,
                "pools",
                "/pools",
                q,
                more,
                pools
                    .iter()
                    .map(|v| {
                        (
                            v.pool.id.clone(),
                            dto::pool_json(&ctx.base, v),
                            v.pool.etag.clone(),
                            v.pool.last_modified,
                        )
                    })
                    .collect(),
            )
        }
        Endpoint::PoolGet { pool } | Endpoint::PoolExists { pool } => {
            let conds = Conditions::parse(headers)?;
            let v = match svc.get_pool(account, &pool) {
                Ok(v) => v,
                Err(e) if ctx.head => return Ok(respond::error(ctx, &e)),
                Err(e) => return Err(e),
            };
            match conds.check(&v.pool.etag, v.pool.last_modified, true) {
                Err(Failed::NotModified) => {
                    return Ok(with_resource(
                        empty(StatusCode::NOT_MODIFIED),
                        &v.pool.etag,
                        v.pool.last_modified,
                        None,
                    ));
                }
                Err(Failed::ConditionNotMet) => return Err(BatchError::new(Code::ConditionNotMet)),
                Ok(()) => {}
            }
            let r = if ctx.head {
                empty(StatusCode::OK)
            } else {
                let mut o = dto::pool_json(&ctx.base, &v);
                select(&mut o, q.select.as_deref());
                let mut out = serde_json::Map::new();
                out.insert(
                    "odata.metadata".into(),
                    json!(format!("{}/$metadata#pools/@Element", ctx.base)),
                );
                out.extend(o);
                json_response(Value::Object(out))
            };
            Ok(with_resource(r, &v.pool.etag, v.pool.last_modified, None))
        }
        Endpoint::PoolDelete { pool } => {
            let conds = Conditions::parse(headers)?;
            let pre = |p: &Pool| conds.check_write(&p.etag, p.last_modified);
            svc.delete_pool(account, &pool, &pre).await?;
            Ok(empty(StatusCode::ACCEPTED))
        }
        Endpoint::PoolResize { pool } => {
            let conds = Conditions::parse(headers)?;
            let resize = parse_resize(&body, max_nodes)?;
            let pre = |p: &Pool| conds.check_write(&p.etag, p.last_modified);
            pool_write_answer(
                ctx,
                svc.resize_pool_written(account, &pool, resize, &pre)
                    .await?,
            )
        }
        Endpoint::PoolRemoveNodes { pool } => {
            let conds = Conditions::parse(headers)?;
            let ids = parse_remove_nodes(&body)?;
            let pre = |p: &Pool| conds.check_write(&p.etag, p.last_modified);
            pool_write_answer(
                ctx,
                svc.remove_nodes_written(account, &pool, &ids, &pre).await?,
            )
        }
        Endpoint::ComputeNodeList { pool } => {
            let filter = q
                .filter
                .as_deref()
                .map(|f| parse_filter(f, NODE_FILTER_FIELDS))
                .transpose()?;
            let keep = |v: &NodeView| {
                filter
                    .as_ref()
                    .is_none_or(|f| f.eval(&|k| dto::node_field(v, k)))
            };
            // On PostgreSQL a query: `state eq '…'` of the filter narrows it in the database.
            let state = filter
                .as_ref()
                .and_then(|f| f.required_eq("state"))
                .map(|s| s.to_ascii_lowercase());
            let (nodes, more) = svc
                .list_nodes_query(
                    account,
                    &pool,
                    &keep,
                    q.skip_token.as_deref(),
                    state.as_deref(),
                    q.max_results as usize,
                )
                .await?;
            let ip = &svc.config().remote_login_ip;
            let path = format!("/pools/{}/nodes", encode(&pool));
            list_answer(
                ctx,
                "nodes",
                &path,
                q,
                more,
                nodes
                    .iter()
                    .map(|v| {
                        (
                            v.node.id.clone(),
                            dto::node_json(&ctx.base, v, ip),
                            v.node.etag.clone(),
                            v.node.last_modified,
                        )
                    })
                    .collect(),
            )
        }
        Endpoint::ComputeNodeGet { pool, node } => {
            let v = svc.get_node(account, &pool, &node)?;
            let metadata = format!("{}/$metadata#nodes/@Element", ctx.base);
            let node = dto::NodeJson::new(&ctx.base, &v, &svc.config().remote_login_ip)
                .element(&metadata, q.select.as_deref());
            Ok(with_resource(
                respond::json_of(&node),
                &v.node.etag,
                v.node.last_modified,
                None,
            ))
        }
        Endpoint::ComputeNodeAddUser { pool, node } => {
            let user = parse_add_user(&body)?;
            let at = UserAddr {
                account,
                pool: &pool,
                node: &node,
                timeout: Some(q.ack_wait()),
            };
            // No hash for a request the write would refuse (it checks again), checked on a
            // cache that holds what every replica committed before this request.
            if user.password.is_some() {
                svc.sync().await?;
                svc.check_user_target(&at, None, &user)?;
            }
            let hash = hash(user.password.as_deref()).await?;
            let w = svc.add_user(at, user, hash).await?;
            let url = dto::user_url(&ctx.base, &w.pool_id, &node, &w.user_name);
            Ok(with_written(
                empty(StatusCode::CREATED),
                w.etag,
                w.last_modified,
                Some(url),
            ))
        }
        Endpoint::ComputeNodeUpdateUser { pool, node, user } => {
            let body = parse_update_user(&body)?;
            let at = UserAddr {
                account,
                pool: &pool,
                node: &node,
                timeout: Some(q.ack_wait()),
            };
            // No hash for a request the write would refuse (it checks again), checked on a
            // cache that holds what every replica committed before this request.
            if body.password.is_some() {
                svc.sync().await?;
                svc.check_user_target(&at, Some(&user), &body)?;
            }
            let hash = hash(body.password.as_deref()).await?;
            let w = svc.update_user(at, &user, body, hash).await?;
            let url = dto::user_url(&ctx.base, &w.pool_id, &node, &w.user_name);
            Ok(with_written(
                empty(StatusCode::OK),
                w.etag,
                w.last_modified,
                Some(url),
            ))
        }
        Endpoint::ComputeNodeDeleteUser { pool, node, user } => {
            svc.delete_user(
                UserAddr {
                    account,
                    pool: &pool,
                    node: &node,
                    timeout: Some(q.ack_wait()),
                },
                &user,
            )
            .await?;
            Ok(empty(StatusCode::OK))
        }
        Endpoint::ComputeNodeGetRemoteLoginSettings { pool, node } => {
            let (ip, port, v) = svc.remote_login_settings(account, &pool, &node)?;
            let r = json_response(json!({"remoteLoginIPAddress": ip, "remoteLoginPort": port}));
            Ok(with_resource(r, &v.node.etag, v.node.last_modified, None))
        }
        Endpoint::ComputeNodeReboot { pool, node } => {
            parse_node_option(&body, "nodeRebootOption", NODE_DEALLOCATION_OPTIONS, false)?;
            let w = svc.reboot_node_written(account, &pool, &node).await?;
            node_write_answer(ctx, w, StatusCode::ACCEPTED)
        }
        Endpoint::ComputeNodeReimage { pool, node } => {
            parse_node_option(&body, "nodeReimageOption", NODE_DEALLOCATION_OPTIONS, false)?;
            let w = svc.reimage_node_written(account, &pool, &node).await?;
            node_write_answer(ctx, w, StatusCode::ACCEPTED)
        }
        Endpoint::ComputeNodeDisableScheduling { pool, node } => {
            // azure-batch 15.0.0b1 (the az CLI's) wraps this option once: accept that.
            parse_node_option(
                &body,
                "nodeDisableSchedulingOption",
                DISABLE_SCHEDULING_OPTIONS,
                true,
            )?;
            let w = svc
                .set_scheduling(account, &pool, &node, SchedulingState::Disabled)
                .await?;
            node_write_answer(ctx, w, StatusCode::OK)
        }
        Endpoint::ComputeNodeEnableScheduling { pool, node } => {
            let w = svc
                .set_scheduling(account, &pool, &node, SchedulingState::Enabled)
                .await?;
            node_write_answer(ctx, w, StatusCode::OK)
        }
    }
}

fn pool_write_answer(ctx: &Ctx, w: PoolWritten) -> Answer {
    let url = dto::pool_url(&ctx.base, &w.pool_id);
    Ok(with_resource(
        empty(StatusCode::ACCEPTED),
        &w.etag,
        w.last_modified,
        Some(&url),
    ))
}

fn node_write_answer(ctx: &Ctx, w: NodeWritten, status: StatusCode) -> Answer {
    let url = dto::node_url(&ctx.base, &w.pool_id, &w.node_id);
    Ok(with_resource(
        empty(status),
        &w.etag,
        w.last_modified,
        Some(&url),
    ))
}

type Item = (
    String,
    serde_json::Map<String, Value>,
    String,
    time::OffsetDateTime,
);

/// A list page: `odata.metadata`, `value`, and `odata.nextLink` when more follow. ETag and
/// Last-Modified are those of the newest item listed.
fn list_answer(
    ctx: &Ctx,
    kind: &str,
    path: &str,
    q: &Query,
    more: bool,
    items: Vec<Item>,
) -> Answer {
    let mut out = serde_json::Map::new();
    out.insert(
        "odata.metadata".into(),
        json!(format!("{}/$metadata#{kind}", ctx.base)),
    );
    let newest = items.iter().max_by_key(|i| i.3).map(|i| (i.2.clone(), i.3));
    let last_id = items.last().map(|i| i.0.clone());
    let values: Vec<Value> = items
        .into_iter()
        .map(|(_, mut o, _, _)| {
            select(&mut o, q.select.as_deref());
            Value::Object(o)
        })
        .collect();
    out.insert("value".into(), Value::Array(values));
    if more && let Some(last) = last_id {
        out.insert(
            "odata.nextLink".into(),
            json!(next_link(ctx, path, q, &last)),
        );
    }
    let r = json_response(Value::Object(out));
    Ok(match newest {
        Some((etag, lm)) => with_resource(r, &etag, lm, None),
        None => r,
    })
}
