//! Conversations to token ids plus a training mask (docs/design.md, "Conversation rendering"):
//! the layout and mask of nanochat's `render_conversation`, the same at 48abd7d and 92d63d4.
//!
//! Two steps, so the GIL is held only for the cheap one:
//! 1. `Planner` validates a conversation message by message and appends a short list of
//!    `Op`s (a special token, or a text referenced by index, each with its mask bit). Texts
//!    are referenced by index into the caller's table, so the Python layer can borrow every
//!    str's UTF-8 in place (no copies).
//! 2. `render_batch` tokenizes the ops of many conversations in parallel (no GIL needed) into
//!    flat buffers that Python wraps with `np.frombuffer`.

use crate::tokenizer::Core;
use rayon::prelude::*;

/// The special tokens rendering needs, in `Sp` order.
pub const CHAT_SPECIALS: [&str; 9] = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Sp {
    Bos,
    UserStart,
    UserEnd,
    AssistantStart,
    AssistantEnd,
    PythonStart,
    PythonEnd,
    OutputStart,
    OutputEnd,
}

/// Ids of `CHAT_SPECIALS` in one vocabulary.
#[derive(Clone, Copy, Debug)]
pub struct ChatIds(pub [u32; 9]);

impl ChatIds {
    pub fn from_core(core: &Core) -> Result<ChatIds, String> {
        let mut ids = [0u32; 9];
        for (slot, name) in ids.iter_mut().zip(CHAT_SPECIALS) {
            *slot = *core.special_by_name.get(name).ok_or_else(|| {
                format!("the tokenizer has no special token '{name}', which rendering conversations needs")
            })?;
        }
        Ok(ChatIds(ids))
    }

    #[inline]
    pub fn get(&self, s: Sp) -> u32 {
        self.0[s as usize]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartKind {
    Text,
    Python,
    Output,
}

impl PartKind {
    pub fn parse(s: &str) -> Option<PartKind> {
        match s {
            "text" => Some(PartKind::Text),
            "python" => Some(PartKind::Python),
            "python_output" => Some(PartKind::Output),
            _ => None,
        }
    }
}

/// A text of the caller's string table, or a system text merged into the first user text
/// (`system + "\n\n" + user`, tokenized as one string like the reference).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextRef {
    One(u32),
    Joined(u32, u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Special(Sp, u8),
    Text(TextRef, u8),
}

/// Ops of many conversations, flattened: conversation i is `ops[starts[i]..starts[i + 1]]`.
#[derive(Debug)]
pub struct Plans {
    pub ops: Vec<Op>,
    pub starts: Vec<usize>,
}

impl Default for Plans {
    fn default() -> Self {
        Plans { ops: Vec::new(), starts: vec![0] }
    }
}

impl Plans {
    pub fn len(&self) -> usize {
        self.starts.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn conv(&self, i: usize) -> &[Op] {
        &self.ops[self.starts[i]..self.starts[i + 1]]
    }

    /// Starts a conversation; call `Planner::finish` (or drop it on error, which discards it).
    pub fn planner(&mut self) -> Planner<'_> {
        let mark = self.ops.len();
        self.ops.push(Op::Special(Sp::Bos, 0));
        Planner { plans: self, mark, msg: 0, turns: 0, system: None, done: false }
    }
}

/// Checks role order (optional leading system, then user, assistant, user, ...) and emits
/// the ops of each message. Errors name the message index (system included).
pub struct Planner<'p> {
    plans: &'p mut Plans,
    mark: usize,
    msg: usize,
    turns: usize,
    system: Option<u32>,
    done: bool,
}

impl Drop for Planner<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.plans.ops.truncate(self.mark);
        }
    }
}

impl Planner<'_> {
    /// Index the next message will have.
    pub fn index(&self) -> usize {
        self.msg
    }

    /// Whether the next message may have `role`.
    pub fn expect(&self, role: Role) -> Result<(), String> {
        let i = self.msg;
        if role == Role::System {
            return if i == 0 {
                Ok(())
            } else {
                Err(format!(
                    "message {i}: expected role '{}', got 'system' (a system message may only come first)",
                    self.expected().name()
                ))
            };
        }
        let want = self.expected();
        if role != want {
            return Err(format!("message {i}: expected role '{}', got '{}'", want.name(), role.name()));
        }
        Ok(())
    }

    fn expected(&self) -> Role {
        if self.turns.is_multiple_of(2) {
            Role::User
        } else {
            Role::Assistant
        }
    }

    fn push(&mut self, op: Op) {
        self.plans.ops.push(op);
    }

    pub fn system(&mut self, text: u32) -> Result<(), String> {
        self.expect(Role::System)?;
        self.system = Some(text);
        self.msg += 1;
        Ok(())
    }

    pub fn user(&mut self, text: u32) -> Result<(), String> {
        self.expect(Role::User)?;
        let text = match self.system.take() {
            Some(sys) => TextRef::Joined(sys, text),
            None => TextRef::One(text),
        };
        self.push(Op::Special(Sp::UserStart, 0));
        self.push(Op::Text(text, 0));
        self.push(Op::Special(Sp::UserEnd, 0));
        self.msg += 1;
        self.turns += 1;
        Ok(())
    }

    /// An assistant message; string content is one `Text` part.
    pub fn assistant(&mut self, parts: impl IntoIterator<Item = (PartKind, u32)>) -> Result<(), String> {
        self.expect(Role::Assistant)?;
        self.push(Op::Special(Sp::AssistantStart, 0));
        for (kind, t) in parts {
            let t = TextRef::One(t);
            match kind {
                PartKind::Text => self.push(Op::Text(t, 1)),
                PartKind::Python => {
                    self.push(Op::Special(Sp::PythonStart, 1));
                    self.push(Op::Text(t, 1));
                    self.push(Op::Special(Sp::PythonEnd, 1));
                }
                PartKind::Output => {
                    self.push(Op::Special(Sp::OutputStart, 0));
                    self.push(Op::Text(t, 0));
                    self.push(Op::Special(Sp::OutputEnd, 0));
                }
            }
        }
        self.push(Op::Special(Sp::AssistantEnd, 1));
        self.msg += 1;
        self.turns += 1;
        Ok(())
    }

    fn check_complete(&self) -> Result<(), String> {
        if self.msg == 0 {
            return Err("the conversation has no messages".into());
        }
        if self.system.is_some() {
            return Err("message 0: a system message must be followed by a user message".into());
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<(), String> {
        self.check_complete()?;
        self.done = true;
        self.plans.starts.push(self.plans.ops.len());
        Ok(())
    }

    /// Ends a prompt for generation: the messages so far, then `<|assistant_start|>`.
    pub fn finish_for_completion(mut self) -> Result<(), String> {
        self.check_complete()?;
        self.push(Op::Special(Sp::AssistantStart, 0));
        self.done = true;
        self.plans.starts.push(self.plans.ops.len());
        Ok(())
    }
}

/// Appends one conversation's tokens and mask, stopping once `max_tokens` were added.
pub fn render_ops(
    core: &Core,
    chat: &ChatIds,
    ops: &[Op],
    texts: &[&str],
    max_tokens: usize,
    ids: &mut Vec<u32>,
    mask: &mut Vec<u8>,
) -> Result<(), String> {
    let start = ids.len();
    let limit = start.saturating_add(max_tokens);
    for op in ops {
        if ids.len() >= limit {
            break;
        }
        match *op {
            Op::Special(s, m) => {
                ids.push(chat.get(s));
                mask.push(m);
            }
            Op::Text(t, m) => {
                match t {
                    TextRef::One(i) => core.encode_into(texts[i as usize], ids)?,
                    TextRef::Joined(a, b) => {
                        let s = format!("{}\n\n{}", texts[a as usize], texts[b as usize]);
                        core.encode_into(&s, ids)?
                    }
                }
                mask.resize(ids.len(), m);
            }
        }
    }
    ids.truncate(limit);
    mask.truncate(limit);
    Ok(())
}

/// Rendered conversations, flattened: conversation i is `ids[offsets[i]..offsets[i + 1]]`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Rendered {
    pub ids: Vec<u32>,
    pub mask: Vec<u8>,
    pub offsets: Vec<usize>,
}

/// Renders every planned conversation in parallel on the current rayon pool. An error
/// carries the index of the failing conversation.
pub fn render_batch(
    core: &Core,
    chat: &ChatIds,
    plans: &Plans,
    texts: &[&str],
    max_tokens: usize,
) -> Result<Vec<Rendered>, (usize, String)> {
    let n = plans.len();
    // Chunks of conversations so each task has enough work and its own output buffers.
    let chunk = (n / (rayon::current_num_threads() * 8)).clamp(1, 256);
    let n_chunks = n.div_ceil(chunk);
    (0..n_chunks)
        .into_par_iter()
        .map(|c| render_range(core, chat, plans, texts, max_tokens, c * chunk..((c + 1) * chunk).min(n)))
        .collect()
}

/// Renders the planned conversations `convs` in order on this thread into one `Rendered`.
pub fn render_range(
    core: &Core,
    chat: &ChatIds,
    plans: &Plans,
    texts: &[&str],
    max_tokens: usize,
    convs: std::ops::Range<usize>,
) -> Result<Rendered, (usize, String)> {
    let mut r = Rendered { offsets: vec![0], ..Default::default() };
    for i in convs {
        render_ops(core, chat, plans.conv(i), texts, max_tokens, &mut r.ids, &mut r.mask).map_err(|e| (i, e))?;
        r.offsets.push(r.ids.len());
    }
    Ok(r)
}

/// Joins chunk outputs into one `Rendered` (used by Rust callers; Python gets bytes).
pub fn join(parts: Vec<Rendered>) -> Rendered {
    let mut out = Rendered { offsets: vec![0], ..Default::default() };
    for p in parts {
        let base = out.ids.len();
        out.ids.extend_from_slice(&p.ids);
        out.mask.extend_from_slice(&p.mask);
        out.offsets.extend(p.offsets[1..].iter().map(|o| o + base));
    }
    out
}

/// A message as Rust code writes it (for Rust callers and tests).
pub enum Content<'a> {
    Text(&'a str),
    /// (part type, text), the type being "text", "python" or "python_output".
    Parts(Vec<(&'a str, &'a str)>),
}

pub struct Message<'a> {
    pub role: &'a str,
    pub content: Content<'a>,
}

/// Plans one conversation of Rust messages into `plans`, pushing its texts onto `texts`.
pub fn plan_messages<'a>(
    plans: &mut Plans,
    texts: &mut Vec<&'a str>,
    msgs: &[Message<'a>],
    completion: bool,
) -> Result<(), String> {
    let msgs = if completion {
        match msgs.last() {
            None => return Err("the conversation has no messages".into()),
            Some(m) if m.role != "assistant" => {
                return Err(format!(
                    "message {}: the last message must be from the assistant to render for completion, got '{}'",
                    msgs.len() - 1,
                    m.role
                ))
            }
            Some(_) => &msgs[..msgs.len() - 1],
        }
    } else {
        msgs
    };
    let mut p = plans.planner();
    for (i, m) in msgs.iter().enumerate() {
        let role = Role::parse(m.role).ok_or_else(|| unknown_role(i, m.role))?;
        p.expect(role)?;
        let mut push = |s: &'a str| {
            texts.push(s);
            (texts.len() - 1) as u32
        };
        match (role, &m.content) {
            (Role::System, Content::Text(s)) => p.system(push(s))?,
            (Role::User, Content::Text(s)) => p.user(push(s))?,
            (Role::Assistant, Content::Text(s)) => p.assistant([(PartKind::Text, push(s))])?,
            (Role::Assistant, Content::Parts(parts)) => {
                let mut v = Vec::with_capacity(parts.len());
                for (j, (ty, s)) in parts.iter().enumerate() {
                    let kind = PartKind::parse(ty).ok_or_else(|| unknown_part(i, j, ty))?;
                    v.push((kind, push(s)));
                }
                p.assistant(v)?
            }
            (r, Content::Parts(_)) => return Err(format!("message {i}: {} content must be a str, got list", r.name())),
        }
    }
    if completion {
        p.finish_for_completion()
    } else {
        p.finish()
    }
}

/// Renders one conversation of Rust messages (`max_tokens` None: no truncation).
pub fn render_messages(
    core: &Core,
    msgs: &[Message<'_>],
    max_tokens: Option<usize>,
) -> Result<(Vec<u32>, Vec<u8>), String> {
    let chat = ChatIds::from_core(core)?;
    let mut plans = Plans::default();
    let mut texts = Vec::new();
    plan_messages(&mut plans, &mut texts, msgs, false)?;
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    render_ops(core, &chat, plans.conv(0), &texts, max_tokens.unwrap_or(usize::MAX), &mut ids, &mut mask)?;
    Ok((ids, mask))
}

pub fn unknown_role(i: usize, role: &str) -> String {
    format!("message {i}: unknown role '{role}' (expected 'system', 'user' or 'assistant')")
}

pub fn unknown_part(i: usize, j: usize, ty: &str) -> String {
    format!("message {i}, part {j}: unknown part type '{ty}' (expected 'text', 'python' or 'python_output')")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level vocabulary (no merges) with the chat specials, so text ids are its bytes.
    fn byte_core() -> Core {
        let ranks = (0..=255u8).map(|b| (vec![b], b as u32)).collect();
        let specials = CHAT_SPECIALS.iter().enumerate().map(|(i, s)| (s.to_string(), 256 + i as u32)).collect();
        Core::new(ranks, &crate::pretokenize::default_pattern(), specials).unwrap()
    }

    fn sp(s: Sp) -> u32 {
        256 + s as u32
    }

    fn bytes(s: &str) -> Vec<u32> {
        s.bytes().map(u32::from).collect()
    }

    #[test]
    fn layout_and_mask_follow_render_conversation() {
        let core = byte_core();
        let msgs = [
            Message { role: "system", content: Content::Text("S") },
            Message { role: "user", content: Content::Text("hi") },
            Message {
                role: "assistant",
                content: Content::Parts(vec![("text", "a"), ("python", "1+1"), ("python_output", "2"), ("text", "")]),
            },
        ];
        let (ids, mask) = render_messages(&core, &msgs, None).unwrap();
        let mut want = vec![(sp(Sp::Bos), 0), (sp(Sp::UserStart), 0)];
        want.extend(bytes("S\n\nhi").into_iter().map(|b| (b, 0)));
        want.push((sp(Sp::UserEnd), 0));
        want.push((sp(Sp::AssistantStart), 0));
        want.extend(bytes("a").into_iter().map(|b| (b, 1)));
        want.push((sp(Sp::PythonStart), 1));
        want.extend(bytes("1+1").into_iter().map(|b| (b, 1)));
        want.push((sp(Sp::PythonEnd), 1));
        want.push((sp(Sp::OutputStart), 0));
        want.push((bytes("2")[0], 0));
        want.push((sp(Sp::OutputEnd), 0));
        want.push((sp(Sp::AssistantEnd), 1));
        let got: Vec<(u32, u8)> = ids.into_iter().zip(mask).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn truncation_is_a_prefix() {
        let core = byte_core();
        let msgs = [
            Message { role: "user", content: Content::Text("hello there") },
            Message { role: "assistant", content: Content::Text("general kenobi") },
        ];
        let (full_ids, full_mask) = render_messages(&core, &msgs, None).unwrap();
        for n in 0..=full_ids.len() + 2 {
            let (ids, mask) = render_messages(&core, &msgs, Some(n)).unwrap();
            let k = n.min(full_ids.len());
            assert_eq!(ids, full_ids[..k]);
            assert_eq!(mask, full_mask[..k]);
        }
    }

    #[test]
    fn role_errors_name_the_message() {
        let core = byte_core();
        let t = |role: &'static str| Message { role, content: Content::Text("x") };
        let err = |msgs: &[Message]| render_messages(&core, msgs, None).unwrap_err();
        assert_eq!(err(&[]), "the conversation has no messages");
        assert_eq!(err(&[t("user"), t("user")]), "message 1: expected role 'assistant', got 'user'");
        assert_eq!(err(&[t("assistant")]), "message 0: expected role 'user', got 'assistant'");
        assert!(err(&[t("user"), t("system")]).starts_with("message 1: expected role 'assistant', got 'system'"));
        assert_eq!(err(&[t("system")]), "message 0: a system message must be followed by a user message");
        assert!(err(&[t("user"), t("tool")]).starts_with("message 1: unknown role 'tool'"));
        let bad_part = Message { role: "assistant", content: Content::Parts(vec![("text", "a"), ("image", "b")]) };
        assert!(err(&[t("user"), bad_part]).starts_with("message 1, part 1: unknown part type 'image'"));
    }

    #[test]
    fn batch_matches_single_and_names_failures() {
        let core = byte_core();
        let chat = ChatIds::from_core(&core).unwrap();
        let convs: Vec<Vec<Message>> = (0..50)
            .map(|i| {
                let mut v = vec![];
                for k in 0..(i % 4 + 1) {
                    v.push(Message {
                        role: if k % 2 == 0 { "user" } else { "assistant" },
                        content: Content::Text("ab c"),
                    });
                }
                v
            })
            .collect();
        let mut plans = Plans::default();
        let mut texts = Vec::new();
        for c in &convs {
            plan_messages(&mut plans, &mut texts, c, false).unwrap();
        }
        let all = join(render_batch(&core, &chat, &plans, &texts, 7).unwrap());
        assert_eq!(all.offsets.len(), 51);
        for (i, c) in convs.iter().enumerate() {
            let (ids, mask) = render_messages(&core, c, Some(7)).unwrap();
            let (a, b) = (all.offsets[i], all.offsets[i + 1]);
            assert_eq!(all.ids[a..b], ids[..]);
            assert_eq!(all.mask[a..b], mask[..]);
        }
        // A failed planner leaves no ops behind.
        let n_ops = plans.ops.len();
        let bad = [Message { role: "assistant", content: Content::Text("x") }];
        assert!(plan_messages(&mut plans, &mut texts, &bad, false).is_err());
        assert_eq!(plans.ops.len(), n_ops);
        assert_eq!(plans.len(), 50);
    }

    #[test]
    fn completion_drops_the_last_assistant_message() {
        let core = byte_core();
        let chat = ChatIds::from_core(&core).unwrap();
        let msgs = [
            Message { role: "user", content: Content::Text("q") },
            Message { role: "assistant", content: Content::Text("a") },
        ];
        let mut plans = Plans::default();
        let mut texts = Vec::new();
        plan_messages(&mut plans, &mut texts, &msgs, true).unwrap();
        let r = join(render_batch(&core, &chat, &plans, &texts, usize::MAX).unwrap());
        let want = vec![sp(Sp::Bos), sp(Sp::UserStart), b'q' as u32, sp(Sp::UserEnd), sp(Sp::AssistantStart)];
        assert_eq!(r.ids, want);
        assert!(plan_messages(&mut plans, &mut texts, &msgs[..1], true)
            .unwrap_err()
            .contains("must be from the assistant"));
    }

    #[test]
    fn missing_special_is_named() {
        let ranks = (0..=255u8).map(|b| (vec![b], b as u32)).collect();
        let specials = vec![("<|bos|>".to_string(), 256)];
        let core = Core::new(ranks, &crate::pretokenize::default_pattern(), specials).unwrap();
        let e = ChatIds::from_core(&core).unwrap_err();
        assert!(e.contains("'<|user_start|>'"), "{e}");
    }
}
