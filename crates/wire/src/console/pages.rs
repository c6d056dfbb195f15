//! The console's pages, rendered on the server as plain HTML. Every piece of text that comes from
//! a request or the state passes through [`escape`].

use super::PREFIX;
use crate::percent::encode;
use bluebatch_core::error::BatchError;
use bluebatch_core::model::{NodeState, NodeUser, SchedulingState};
use bluebatch_core::sshkey::fingerprint;
use bluebatch_core::timefmt::iso;
use bluebatch_service::{AppliedUsers, LoginRecord, NodeView, PoolView};
use serde::Serialize;
use std::fmt::Write;

/// HTML-escapes text for element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The wire spelling of a model enum (`steady`, `linux`, `enabled`).
fn wire<T: Serialize>(t: T) -> String {
    match serde_json::to_value(t) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// What every page around `<main>` needs.
pub struct Frame<'a> {
    pub title: &'a str,
    /// The signed-in account, `None` on the sign-in page.
    pub account: Option<&'a str>,
    pub csrf: &'a str,
    /// The service clock, ISO 8601.
    pub clock: String,
    /// The clock's offset from the wall clock, as text.
    pub offset: String,
}

/// A whole page around `main` (the inner HTML of `<main>`).
pub fn page(f: &Frame<'_>, main: &str) -> String {
    let mut h = String::with_capacity(main.len() + 2048);
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · bluebatch console</title>\
         <link rel=\"stylesheet\" href=\"{PREFIX}/assets/console.css\">\
         <script src=\"{PREFIX}/assets/console.js\" defer></script></head><body>\
         <a class=\"skip\" href=\"#main\">Skip to content</a>\
         <header><nav aria-label=\"Main\"><a class=\"brand\" href=\"{PREFIX}/\">bluebatch</a>",
        title = escape(f.title)
    );
    if let Some(account) = f.account {
        let _ = write!(
            h,
            "<a href=\"{PREFIX}/\">Pools</a></nav>\
             <div class=\"who\"><span>account <strong>{acct}</strong></span>\
             <span>clock <span id=\"clock-text\">{clock} ({offset})</span></span>\
             <form method=\"post\" action=\"{PREFIX}/sign-out\">{csrf}\
             <button type=\"submit\">Sign out</button></form></div>",
            acct = escape(account),
            clock = escape(&f.clock),
            offset = escape(&f.offset),
            csrf = csrf_field(f.csrf),
        );
    } else {
        h.push_str("</nav>");
    }
    let _ = writeln!(
        h,
        "</header><main id=\"main\" tabindex=\"-1\"{live}>{main}</main></body></html>",
        live = if f.account.is_some() {
            format!(" data-events=\"{PREFIX}/events\"")
        } else {
            String::new()
        }
    );
    h
}

pub fn csrf_field(token: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        escape(token)
    )
}

/// An error message for assistive tools and people: `role="alert"`.
pub fn alert(id: &str, text: &str) -> String {
    format!(
        "<p class=\"error\" role=\"alert\" id=\"{}\">{}</p>",
        escape(id),
        escape(text)
    )
}

/// The Batch error as the console shows it: code and message, with the reason when given.
pub fn error_text(e: &BatchError) -> String {
    let mut t = format!("{}: {}", e.code.as_str(), e.text());
    for (k, v) in &e.values {
        if k == "Reason" {
            let _ = write!(t, " ({v})");
        }
    }
    t
}

/// The property an error names (`PropertyName`), if any.
pub fn error_property(e: &BatchError) -> Option<&str> {
    e.values
        .iter()
        .find(|(k, _)| k == "PropertyName")
        .map(|(_, v)| v.as_str())
}

pub fn sign_in(account: &str, error: Option<&str>) -> String {
    let mut h = String::from("<h1>Sign in</h1>");
    if let Some(e) = error {
        h.push_str(&alert("sign-in-error", e));
    }
    let _ = write!(
        h,
        "<form method=\"post\" action=\"{PREFIX}/sign-in\" class=\"card\">\
         <label for=\"account\">Account name</label>\
         <input id=\"account\" name=\"account\" autocomplete=\"username\" required value=\"{}\">\
         <label for=\"key\">Account key</label>\
         <input id=\"key\" name=\"key\" type=\"password\" autocomplete=\"current-password\" required>\
         <button type=\"submit\">Sign in</button></form>\
         <p class=\"hint\">The key is the account's base64 key, as the API's Shared Key uses it.</p>",
        escape(account)
    );
    h
}

fn pool_href(pool: &str) -> String {
    format!("{PREFIX}/pools/{}", encode(pool))
}

fn node_href(pool: &str, node: &str) -> String {
    format!("{PREFIX}/pools/{}/nodes/{}", encode(pool), encode(node))
}

/// The pools page: each pool with its OS, VM size, allocation state, node counts by state and
/// last change.
pub fn pools(pools: &[(PoolView, Vec<NodeView>)], clock: &str) -> String {
    let mut h = String::from("<h1>Pools</h1>");
    if pools.is_empty() {
        h.push_str("<p>No pools in this account yet.</p>");
        h.push_str(clock);
        return h;
    }
    h.push_str(
        "<div class=\"scroll\"><table><caption>Pools of the account</caption><thead><tr>\
         <th scope=\"col\">Id</th><th scope=\"col\">OS</th><th scope=\"col\">VM size</th>\
         <th scope=\"col\">Allocation</th><th scope=\"col\">Nodes</th>\
         <th scope=\"col\">Last change</th></tr></thead><tbody>",
    );
    for (v, nodes) in pools {
        let p = &v.pool;
        let last = nodes
            .iter()
            .map(|n| n.node.last_modified)
            .chain([p.last_modified, p.allocation_state_transition_time])
            .max()
            .unwrap_or(p.last_modified);
        let _ = write!(
            h,
            "<tr><td><a href=\"{href}\">{id}</a></td><td>{os}</td><td>{vm}</td>\
             <td>{alloc} (target {td} dedicated, {tl} low-priority)</td><td>{counts}</td>\
             <td><time>{last}</time></td></tr>",
            href = escape(&pool_href(&p.id)),
            id = escape(&p.id),
            os = escape(&wire(p.os)),
            vm = escape(&p.vm_size),
            alloc = escape(&wire(p.allocation_state)),
            td = p.target_dedicated,
            tl = p.target_low_priority,
            counts = escape(&state_counts(nodes)),
            last = iso(last),
        );
    }
    h.push_str("</tbody></table></div>");
    h.push_str(clock);
    h
}

/// "2 idle, 1 starting" (states in the API's order); "none" for no node.
fn state_counts(nodes: &[NodeView]) -> String {
    let parts: Vec<String> = NodeState::ALL
        .iter()
        .filter_map(|s| {
            let n = nodes.iter().filter(|v| v.node.state == *s).count();
            (n > 0).then(|| format!("{n} {}", s.as_str()))
        })
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// Where a node's SSH endpoint is reached: (address, port), `None` for no endpoint (yet).
pub type Endpoint = Option<(String, u16)>;

/// A pool's nodes page.
pub fn nodes(pool: &PoolView, nodes: &[(NodeView, Endpoint)], csrf: &str) -> String {
    let p = &pool.pool;
    let mut h = format!(
        "<p class=\"crumbs\"><a href=\"{PREFIX}/\">Pools</a> / {id}</p><h1>Pool {id}</h1>\
         <p>{os}, {vm}, allocation {alloc}, target {td} dedicated and {tl} low-priority nodes.</p>",
        id = escape(&p.id),
        os = escape(&wire(p.os)),
        vm = escape(&p.vm_size),
        alloc = escape(&wire(p.allocation_state)),
        td = p.target_dedicated,
        tl = p.target_low_priority,
    );
    let _ = write!(
        h,
        "<form method=\"post\" action=\"{action}\" class=\"inline\">{csrf}\
         <label for=\"targetDedicatedNodes\">Dedicated nodes</label>\
         <input id=\"targetDedicatedNodes\" name=\"targetDedicatedNodes\" inputmode=\"numeric\" \
         size=\"4\" value=\"{td}\">\
         <button type=\"submit\">Resize pool</button></form>",
        action = escape(&format!("{}/resize", pool_href(&p.id))),
        csrf = csrf_field(csrf),
        td = p.target_dedicated,
    );
    if nodes.is_empty() {
        h.push_str("<p>No nodes in this pool now.</p>");
        return h;
    }
    h.push_str(
        "<div class=\"scroll\"><table><caption>Nodes of the pool</caption><thead><tr>\
         <th scope=\"col\">Id</th><th scope=\"col\">State</th><th scope=\"col\">Scheduling</th>\
         <th scope=\"col\">Address</th><th scope=\"col\">SSH port</th>\
         <th scope=\"col\">SSH command</th></tr></thead><tbody>",
    );
    for (v, ep) in nodes {
        let n = &v.node;
        let (addr, port, cmd) = match ep {
            Some((ip, port)) => (
                escape(ip),
                port.to_string(),
                copyable(&format!("ssh -p {port} USER@{ip}")),
            ),
            None => ("—".into(), "—".into(), "—".into()),
        };
        let _ = write!(
            h,
            "<tr><td><a href=\"{href}\">{id}</a></td><td>{state}</td><td>{sched}</td>\
             <td>{addr}</td><td>{port}</td><td>{cmd}</td></tr>",
            href = escape(&node_href(&v.pool_id, &n.id)),
            id = escape(&n.id),
            state = n.state.as_str(),
            sched = escape(&wire(n.scheduling_state)),
        );
    }
    h.push_str("</tbody></table></div>");
    h
}

/// A command shown as code with a Copy button (the script copies the code's text).
fn copyable(cmd: &str) -> String {
    format!(
        "<code>{}</code> <button type=\"button\" class=\"copy\" data-copy=\"{}\">Copy</button>",
        escape(cmd),
        escape(cmd)
    )
}

/// What the Add user form shows again after a refusal: the values given (never the password)
/// and the error, next to the field it names.
#[derive(Default)]
pub struct UserForm {
    pub name: String,
    pub ssh_public_key: String,
    pub expiry_time: String,
    pub is_admin: bool,
    pub error: Option<BatchError>,
    /// A refused Update user: the user and the error (shown in that user's form).
    pub update: Option<(String, BatchError)>,
    /// A refused node action (Reboot, Reimage, scheduling, state, Delete user).
    pub action: Option<BatchError>,
}

/// The key type of an OpenSSH public key line (`ssh-ed25519`).
fn key_type(line: &str) -> &str {
    line.split_whitespace().next().unwrap_or("")
}

/// A node's page: its state, its users as the node enforces them, and the Add user form.
pub fn node(
    v: &NodeView,
    ep: &Endpoint,
    users: &AppliedUsers,
    logins: &[LoginRecord],
    form: &UserForm,
    csrf: &str,
) -> String {
    let n = &v.node;
    let mut h = format!(
        "<p class=\"crumbs\"><a href=\"{PREFIX}/\">Pools</a> / <a href=\"{phref}\">{pool}</a> / \
         {id}</p><h1>Node {id}</h1><dl class=\"facts\"><dt>State</dt><dd>{state}</dd>\
         <dt>Scheduling</dt><dd>{sched}</dd>",
        phref = escape(&pool_href(&v.pool_id)),
        pool = escape(&v.pool_id),
        id = escape(&n.id),
        state = n.state.as_str(),
        sched = escape(&wire(n.scheduling_state)),
    );
    if let Some((ip, port)) = ep {
        let _ = write!(
            h,
            "<dt>SSH</dt><dd>{}</dd>",
            copyable(&format!("ssh -p {port} USER@{ip}"))
        );
    }
    let _ = write!(
        h,
        "<dt>Users revision</dt><dd>{}</dd><dt>Applied revision</dt><dd>{}</dd>",
        n.users_revision,
        users
            .applied_revision
            .map_or("none yet".to_string(), |r| r.to_string())
    );
    if let Some((state, accepts)) = users.login_state {
        let _ = write!(
            h,
            "<dt>SSH endpoint</dt><dd>enforces {}: {}</dd>",
            state.as_str(),
            if accepts {
                "takes logins"
            } else {
                "refuses logins"
            }
        );
    }
    h.push_str("</dl>");
    node_actions(&mut h, v, form, csrf);
    h.push_str("<h2>Users</h2>");
    if users.stored.is_empty() {
        h.push_str("<p>No users on this node.</p>");
    } else {
        h.push_str(
            "<div class=\"scroll\"><table><caption>Users of the node</caption><thead><tr>\
             <th scope=\"col\">Name</th><th scope=\"col\">Password</th><th scope=\"col\">SSH key</th>\
             <th scope=\"col\">Admin</th><th scope=\"col\">Expiry as given</th>\
             <th scope=\"col\">Logins stop at</th><th scope=\"col\">Revision</th>\
             <th scope=\"col\">Applied on node</th></tr></thead><tbody>",
        );
        for u in &users.stored {
            user_row(&mut h, u, users);
        }
        h.push_str("</tbody></table></div>");
        for u in &users.stored {
            user_forms(&mut h, v, u, form, csrf);
        }
    }
    if !users.login_lockouts.is_empty() {
        h.push_str(
            "<h2>Failed-login protection</h2><div class=\"scroll\"><table>\
             <caption>Sources held back</caption><thead><tr><th scope=\"col\">Source</th>\
             <th scope=\"col\">Failures</th><th scope=\"col\">Refused until</th></tr></thead><tbody>",
        );
        for l in &users.login_lockouts {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td><time>{}</time></td></tr>",
                escape(&l.source.to_string()),
                l.failures,
                iso(l.refused_until)
            );
        }
        h.push_str("</tbody></table></div>");
    }
    add_user_form(&mut h, v, form, csrf);
    login_activity(&mut h, logins);
    h
}

/// The node's recorded SSH authentications, newest first (never a password or key).
fn login_activity(h: &mut String, logins: &[LoginRecord]) {
    h.push_str("<h2>Login activity</h2>");
    if logins.is_empty() {
        h.push_str("<p>No logins recorded on this node.</p>");
        return;
    }
    h.push_str(
        "<div class=\"scroll\"><table id=\"logins\"><caption>Accepted and refused logins, \
         newest first</caption><thead><tr><th scope=\"col\">Time</th><th scope=\"col\">User</th>\
         <th scope=\"col\">Source</th><th scope=\"col\">Method</th><th scope=\"col\">Outcome</th>\
         <th scope=\"col\">Reason</th></tr></thead><tbody>",
    );
    for l in logins {
        let _ = write!(
            h,
            "<tr><td><time>{}</time></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            iso(l.time),
            escape(l.user.as_deref().unwrap_or("—")),
            escape(&l.source.to_string()),
            escape(&l.method),
            if l.accepted { "accepted" } else { "refused" },
            escape(l.reason.as_deref().unwrap_or("")),
        );
    }
    h.push_str("</tbody></table></div>");
}

fn user_row(h: &mut String, u: &NodeUser, users: &AppliedUsers) {
    let applied = users
        .applied
        .iter()
        .find(|a| a.name == u.name)
        .is_some_and(|a| *a == u.to_account());
    let key = match u.ssh_public_key.as_deref() {
        Some(k) => format!(
            "{} <code>{}</code>",
            escape(key_type(k)),
            escape(&fingerprint(k).unwrap_or_default())
        ),
        None => "none".into(),
    };
    let _ = write!(
        h,
        "<tr><td>{name}</td><td>{pw}</td><td>{key}</td><td>{admin}</td>\
         <td><time>{exp}</time></td><td><time>{stop}</time></td><td>{rev}</td><td>{applied}</td></tr>",
        name = escape(&u.name),
        pw = if u.password_hash.is_some() {
            "set"
        } else {
            "none"
        },
        admin = if u.is_admin { "yes" } else { "no" },
        exp = iso(u.expiry_time),
        stop = iso(u.login_refused_from),
        rev = u.revision,
        applied = if applied { "yes" } else { "not yet" },
    );
}

/// One labelled input of the user form, with its error (if the refusal names it) next to it.
fn field(h: &mut String, name: &str, label: &str, input: &str, form: &UserForm) {
    field_in(h, name, name, label, input, form.error.as_ref());
}

/// [`field`] for an input whose id is `id`, with the refusal `error` of its form.
fn field_in(
    h: &mut String,
    name: &str,
    id: &str,
    label: &str,
    input: &str,
    error: Option<&BatchError>,
) {
    let err = error.filter(|e| error_property(e) == Some(name));
    let _ = write!(
        h,
        "<div class=\"field\"><label for=\"{}\">{label}</label>",
        escape(id)
    );
    match err {
        Some(e) => {
            let id = format!("{id}-error");
            let _ = write!(
                h,
                "{}{}",
                input.replacen(
                    "<input ",
                    &format!(
                        "<input aria-invalid=\"true\" aria-describedby=\"{}\" ",
                        escape(&id)
                    ),
                    1
                ),
                alert(&id, &error_text(e))
            );
        }
        None => h.push_str(input),
    }
    h.push_str("</div>");
}

const FIELDS: [&str; 5] = ["name", "password", "sshPublicKey", "expiryTime", "isAdmin"];

fn add_user_form(h: &mut String, v: &NodeView, form: &UserForm, csrf: &str) {
    let _ = write!(
        h,
        "<h2>Add user</h2><form method=\"post\" action=\"{action}\" class=\"card\" \
         id=\"add-user\">{csrf}",
        action = escape(&format!("{}/users", node_href(&v.pool_id, &v.node.id))),
        csrf = csrf_field(csrf),
    );
    // A refusal that names no field of the form is shown above it.
    if let Some(e) = &form.error
        && !error_property(e).is_some_and(|p| FIELDS.contains(&p))
    {
        h.push_str(&alert("add-user-error", &error_text(e)));
    }
    field(
        h,
        "name",
        "Name",
        &format!(
            "<input id=\"name\" name=\"name\" required autocomplete=\"off\" value=\"{}\">",
            escape(&form.name)
        ),
        form,
    );
    field(
        h,
        "password",
        "Password (empty: none)",
        "<input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"new-password\">",
        form,
    );
    field(
        h,
        "sshPublicKey",
        "SSH public key (OpenSSH format; empty: none)",
        &format!(
            "<input id=\"sshPublicKey\" name=\"sshPublicKey\" autocomplete=\"off\" \
             placeholder=\"ssh-ed25519 AAAA…\" value=\"{}\">",
            escape(&form.ssh_public_key)
        ),
        form,
    );
    field(
        h,
        "expiryTime",
        "Expiry time (ISO 8601, e.g. 2030-01-31T00:00:00Z; empty: one day from now)",
        &format!(
            "<input id=\"expiryTime\" name=\"expiryTime\" autocomplete=\"off\" value=\"{}\">",
            escape(&form.expiry_time)
        ),
        form,
    );
    field(
        h,
        "isAdmin",
        "Administrator",
        &format!(
            "<input id=\"isAdmin\" name=\"isAdmin\" type=\"checkbox\" value=\"true\"{}>",
            if form.is_admin { " checked" } else { "" }
        ),
        form,
    );
    h.push_str("<button type=\"submit\">Add user</button></form>");
}

/// A form of one button posting to `action`.
fn button_form(h: &mut String, action: &str, csrf: &str, text: &str) {
    let _ = write!(
        h,
        "<form method=\"post\" action=\"{}\" class=\"inline\">{}\
         <button type=\"submit\">{}</button></form>",
        escape(action),
        csrf_field(csrf),
        escape(text)
    );
}

/// Reboot, Reimage, scheduling and Set state, with a refused action's error above them.
fn node_actions(h: &mut String, v: &NodeView, form: &UserForm, csrf: &str) {
    let base = node_href(&v.pool_id, &v.node.id);
    h.push_str("<h2>Actions</h2>");
    if let Some(e) = &form.action {
        h.push_str(&alert("action-error", &error_text(e)));
    }
    h.push_str("<div class=\"inline\">");
    button_form(h, &format!("{base}/reboot"), csrf, "Reboot");
    button_form(h, &format!("{base}/reimage"), csrf, "Reimage");
    match v.node.scheduling_state {
        SchedulingState::Enabled => button_form(
            h,
            &format!("{base}/disable-scheduling"),
            csrf,
            "Disable scheduling",
        ),
        SchedulingState::Disabled => button_form(
            h,
            &format!("{base}/enable-scheduling"),
            csrf,
            "Enable scheduling",
        ),
    }
    h.push_str("</div>");
    let _ = write!(
        h,
        "<form method=\"post\" action=\"{}\" class=\"inline\">{}\
         <label for=\"state\">Node state</label><select id=\"state\" name=\"state\">",
        escape(&format!("{base}/state")),
        csrf_field(csrf)
    );
    for st in NodeState::ALL {
        let _ = write!(
            h,
            "<option value=\"{s}\"{sel}>{s}</option>",
            s = st.as_str(),
            sel = if st == v.node.state { " selected" } else { "" }
        );
    }
    h.push_str("</select><button type=\"submit\">Set state</button></form>");
}

/// A user's Update user form (stating the replace-all rule) and its Delete user button.
fn user_forms(h: &mut String, v: &NodeView, u: &NodeUser, form: &UserForm, csrf: &str) {
    let base = format!(
        "{}/users/{}",
        node_href(&v.pool_id, &v.node.id),
        encode(&u.name)
    );
    let error = form
        .update
        .as_ref()
        .filter(|(name, _)| *name == u.name)
        .map(|(_, e)| e);
    let _ = write!(
        h,
        "<h3>User {name}</h3><form method=\"post\" action=\"{action}\" class=\"card\">{csrf}\
         <p class=\"hint\">Update user replaces every property: a field left empty removes the \
         password or the SSH key, and an empty expiry resets it to one day from now.</p>",
        name = escape(&u.name),
        action = escape(&format!("{base}/update")),
        csrf = csrf_field(csrf),
    );
    if let Some(e) = error
        && !error_property(e).is_some_and(|p| FIELDS.contains(&p))
    {
        h.push_str(&alert(&format!("{}-update-error", u.name), &error_text(e)));
    }
    let id = |f: &str| format!("{}-{f}", u.name);
    field_in(
        h,
        "password",
        &id("password"),
        "New password (empty: none)",
        &format!(
            "<input id=\"{}\" name=\"password\" type=\"password\" autocomplete=\"new-password\">",
            escape(&id("password"))
        ),
        error,
    );
    field_in(
        h,
        "sshPublicKey",
        &id("sshPublicKey"),
        "SSH public key (empty: none)",
        &format!(
            "<input id=\"{}\" name=\"sshPublicKey\" autocomplete=\"off\" value=\"{}\">",
            escape(&id("sshPublicKey")),
            escape(u.ssh_public_key.as_deref().unwrap_or(""))
        ),
        error,
    );
    field_in(
        h,
        "expiryTime",
        &id("expiryTime"),
        "Expiry time (empty: one day from now)",
        &format!(
            "<input id=\"{}\" name=\"expiryTime\" autocomplete=\"off\" value=\"{}\">",
            escape(&id("expiryTime")),
            iso(u.expiry_time)
        ),
        error,
    );
    h.push_str("<button type=\"submit\">Update user</button></form>");
    button_form(h, &format!("{base}/delete"), csrf, "Delete user");
}

/// The clock form of the pools page: move the service clock forward.
pub fn clock_form(csrf: &str, error: Option<&BatchError>) -> String {
    let mut h = String::from("<h2>Service clock</h2>");
    let _ = write!(
        h,
        "<form method=\"post\" action=\"{PREFIX}/clock/advance\" class=\"inline\">{}",
        csrf_field(csrf)
    );
    field_in(
        &mut h,
        "by",
        "by",
        "Move forward by (e.g. 1d12h, 90s)",
        "<input id=\"by\" name=\"by\" size=\"8\" autocomplete=\"off\">",
        error,
    );
    h.push_str("<button type=\"submit\">Move clock</button></form>");
    h
}

/// A page that only says what went wrong (403, 404).
pub fn problem(title: &str, text: &str) -> String {
    format!(
        "<h1>{}</h1>{}<p><a href=\"{PREFIX}/\">Back to the pools</a></p>",
        escape(title),
        alert("problem", text)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(
            escape("<a href=\"x\">O'Neil & co</a>"),
            "&lt;a href=&quot;x&quot;&gt;O&#39;Neil &amp; co&lt;/a&gt;"
        );
    }
}
