//! `render_conversations`: walks Python conversations (dicts and lists) under the GIL into
//! render plans, keeping every str alive in an arena, then renders them with it released.

use super::guard::{guarded, value_error};
use super::text::encodable;
use super::threads::thread_count;
use super::tokenizer::PyCore;
use crate::le::write_u32s;
use crate::render::{render_batch, render_range, unknown_part, unknown_role, ChatIds, PartKind, Plans, Role};
use crate::threads::with_threads;
use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

/// Keeps Python strs alive while their UTF-8 is borrowed with the GIL released.
struct Arena<'py> {
    strs: Vec<Bound<'py, PyString>>,
}

impl<'py> Arena<'py> {
    /// Adds a str (lone surrogates replaced with U+FFFD, as the tokenizer does) and returns
    /// its index; `what` names the value in the error for a non-str.
    fn push(&mut self, obj: &Bound<'py, PyAny>, what: impl FnOnce() -> String) -> Result<u32, String> {
        let s = obj.cast::<PyString>().map_err(|_| format!("{} must be a str, got {}", what(), type_name(obj)))?;
        let s = encodable(s).map_err(|e| e.to_string())?;
        self.strs.push(s);
        Ok((self.strs.len() - 1) as u32)
    }
}

fn get<'py>(
    d: &Bound<'py, PyDict>,
    key: &Bound<'py, PyString>,
    at: &dyn Fn() -> String,
) -> Result<Bound<'py, PyAny>, String> {
    match d.get_item(key) {
        Ok(Some(v)) => Ok(v),
        Ok(None) => Err(format!("{}: missing key '{}'", at(), key.to_string_lossy())),
        Err(e) => Err(format!("{}: {e}", at())),
    }
}

fn items<'py>(obj: &Bound<'py, PyAny>) -> Option<Vec<Bound<'py, PyAny>>> {
    if let Ok(l) = obj.cast::<PyList>() {
        Some(l.iter().collect())
    } else if let Ok(t) = obj.cast::<PyTuple>() {
        Some(t.iter().collect())
    } else {
        None
    }
}

/// Walks one Python conversation (GIL held), validating it and planning its ops.
fn plan_py<'py>(
    py: Python<'py>,
    plans: &mut Plans,
    arena: &mut Arena<'py>,
    conv: &Bound<'py, PyAny>,
    completion: bool,
    parts_buf: &mut Vec<(PartKind, u32)>,
) -> Result<(), String> {
    let k_messages = intern!(py, "messages");
    let k_role = intern!(py, "role");
    let k_content = intern!(py, "content");
    let k_type = intern!(py, "type");
    let k_text = intern!(py, "text");

    let msgs_obj;
    let msgs_src = if let Ok(d) = conv.cast::<PyDict>() {
        msgs_obj = d
            .get_item(k_messages)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "a conversation dict needs a 'messages' key".to_string())?;
        &msgs_obj
    } else {
        conv
    };
    let mut msgs = items(msgs_src).ok_or_else(|| {
        if msgs_src.is(conv) {
            format!(
                "a conversation must be a dict with a 'messages' list or a list of messages, got {}",
                type_name(conv)
            )
        } else {
            format!("'messages' must be a list, got {}", type_name(msgs_src))
        }
    })?;

    // Roles as parsed; checked here, before any content, for the completion rule.
    let role_of = |i: usize, m: &Bound<'py, PyAny>| -> Result<(Bound<'py, PyDict>, Role), String> {
        let d = m
            .cast::<PyDict>()
            .map_err(|_| format!("message {i} is {}, expected a dict with 'role' and 'content'", type_name(m)))?;
        let at = || format!("message {i}");
        let r = get(d, k_role, &at)?;
        let rs = r.cast::<PyString>().map_err(|_| format!("message {i}: role must be a str, got {}", type_name(&r)))?;
        let rs = rs.to_cow().map_err(|e| format!("message {i}: {e}"))?;
        let role = Role::parse(&rs).ok_or_else(|| unknown_role(i, &rs))?;
        Ok((d.clone(), role))
    };
    if completion {
        let Some(last) = msgs.last() else { return Err("the conversation has no messages".into()) };
        let i = msgs.len() - 1;
        let (_, role) = role_of(i, last)?;
        if role != Role::Assistant {
            return Err(format!(
                "message {i}: the last message must be from the assistant to render for completion, got '{}'",
                role.name()
            ));
        }
        msgs.pop();
    }

    let mut p = plans.planner();
    for (i, m) in msgs.iter().enumerate() {
        let (d, role) = role_of(i, m)?;
        p.expect(role)?;
        let at = || format!("message {i}");
        let content = get(&d, k_content, &at)?;
        match role {
            Role::System | Role::User => {
                let t = arena.push(&content, || format!("message {i}: {} content", role.name()))?;
                if role == Role::System {
                    p.system(t)?
                } else {
                    p.user(t)?
                }
            }
            Role::Assistant => {
                parts_buf.clear();
                if content.is_instance_of::<PyString>() {
                    parts_buf.push((PartKind::Text, arena.push(&content, String::new)?));
                } else if let Some(parts) = items(&content) {
                    for (j, part) in parts.iter().enumerate() {
                        let pd = part.cast::<PyDict>().map_err(|_| {
                            format!(
                                "message {i}, part {j} is {}, expected a dict with 'type' and 'text'",
                                type_name(part)
                            )
                        })?;
                        let at = || format!("message {i}, part {j}");
                        let ty = get(pd, k_type, &at)?;
                        let tys = ty
                            .cast::<PyString>()
                            .map_err(|_| format!("message {i}, part {j}: type must be a str, got {}", type_name(&ty)))?
                            .to_cow()
                            .map_err(|e| format!("message {i}, part {j}: {e}"))?;
                        let kind = PartKind::parse(&tys).ok_or_else(|| unknown_part(i, j, &tys))?;
                        let text = get(pd, k_text, &at)?;
                        parts_buf.push((kind, arena.push(&text, || format!("message {i}, part {j}: text"))?));
                    }
                } else {
                    return Err(format!(
                        "message {i}: assistant content must be a str or a list of parts, got {}",
                        type_name(&content)
                    ));
                }
                p.assistant(parts_buf.drain(..))?
            }
        }
    }
    if completion {
        p.finish_for_completion()
    } else {
        p.finish()
    }
}

/// Renders a list of conversations. Returns (ids int32 LE, mask uint8, offsets int64 LE with
/// len+1 entries). Errors name the conversation (by position, or by `names[position]`)
/// unless `single`. `max_tokens` None: no truncation.
#[pyfunction]
#[pyo3(signature = (core, convs, max_tokens=Some(2048), num_threads=None, completion=false, names=None, single=false))]
#[allow(clippy::too_many_arguments)]
pub fn render_conversations<'py>(
    py: Python<'py>,
    core: &Bound<'py, PyCore>,
    convs: &Bound<'py, PyList>,
    max_tokens: Option<usize>,
    num_threads: Option<i64>,
    completion: bool,
    names: Option<Vec<i64>>,
    single: bool,
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let num_threads = thread_count(num_threads)?;
    let core = &core.get().core;
    let chat = ChatIds::from_core(core).map_err(value_error)?;
    if let Some(n) = &names {
        if n.len() != convs.len() {
            return Err(PyValueError::new_err(format!(
                "names has {} entries for {} conversations",
                n.len(),
                convs.len()
            )));
        }
    }
    let where_ = |i: usize, e: String| {
        if single {
            value_error(e)
        } else {
            let name = names.as_ref().map_or(i as i64, |n| n[i]);
            let sep = if e.starts_with("message") { "," } else { ":" };
            value_error(format!("conversation {name}{sep} {e}"))
        }
    };
    let mut plans = Plans::default();
    plans.starts.reserve(convs.len());
    let mut arena = Arena { strs: Vec::with_capacity(convs.len() * 4) };
    let mut parts_buf = Vec::new();
    guarded(|| {
        for (i, conv) in convs.iter().enumerate() {
            plan_py(py, &mut plans, &mut arena, &conv, completion, &mut parts_buf).map_err(|e| where_(i, e))?;
        }
        Ok::<_, PyErr>(())
    })??;
    let texts: Vec<&str> = arena.strs.iter().map(|s| s.to_str()).collect::<PyResult<_>>()?;
    let max_tokens = max_tokens.unwrap_or(usize::MAX);
    let parts = if plans.len() <= 1 {
        // One conversation: not worth a trip through the pool.
        guarded(|| render_range(core, &chat, &plans, &texts, max_tokens, 0..plans.len()).map(|r| vec![r]))?
    } else {
        py.detach(|| guarded(|| with_threads(num_threads, || render_batch(core, &chat, &plans, &texts, max_tokens))))?
            .map_err(value_error)?
    }
    .map_err(|(i, e)| where_(i, e))?;

    let total: usize = parts.iter().map(|p| p.ids.len()).sum();
    let ids = PyBytes::new_with(py, total * 4, |buf| {
        let mut at = 0;
        for p in &parts {
            write_u32s(&mut buf[at..at + 4 * p.ids.len()], &p.ids);
            at += 4 * p.ids.len();
        }
        Ok(())
    })?;
    let mask = PyBytes::new_with(py, total, |buf| {
        let mut at = 0;
        for p in &parts {
            buf[at..at + p.mask.len()].copy_from_slice(&p.mask);
            at += p.mask.len();
        }
        Ok(())
    })?;
    let mut offsets = Vec::with_capacity((plans.len() + 1) * 8);
    offsets.extend_from_slice(&0i64.to_le_bytes());
    let mut base = 0usize;
    for p in &parts {
        for o in &p.offsets[1..] {
            offsets.extend_from_slice(&((base + o) as i64).to_le_bytes());
        }
        base += p.ids.len();
    }
    Ok((ids, mask, PyBytes::new(py, &offsets)))
}
