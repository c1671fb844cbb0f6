// What the page knows about one training job, folded from its event stream by a pure function.
//
// Two event formats arrive and both are understood: the whole job record in every event (no `type` field), and
// typed deltas: {"type": "step", "step", "loss", ...progress}, {"type": "epoch", "epoch", "validation_loss"},
// {"type": "status", "status", ...}, {"type": "snapshot", ...record or job: record}, {"type": "evaluation", ...}
// (a type may also come as the SSE event name: see job_view.js).
// A type this page does not know is ignored rather than guessed at. Folding either format over the same job gives
// the same state (tested in a real browser), so the page never needs to know which server it talks to.

export const TERMINAL = ["succeeded", "failed", "cancelled"];
const PROGRESS_FIELDS = ["step", "total_steps", "epoch", "loss", "elapsed_s", "remaining_s"];

export function initialState(id = null) {
  return {
    id, name: null, status: "queued", error: null, losses: [], validation: [], progress: {}, epochs: null,
    evaluation: null, resultVersion: null,
  };
}

export function applyEvent(state, event) {
  if (event === null || typeof event !== "object") return state;
  switch (event.type) {
    case undefined: return applyRecord(state, event);
    case "snapshot": case "job": case "record": return applyRecord(state, event.job || event.record || event);
    case "step": return applyStep(state, event);
    case "epoch": return applyEpoch(state, event);
    case "status": return applyStatus(state, event);
    case "evaluation": return { ...state, evaluation: event.evaluation || withoutType(event) };
    default: return state;
  }
}

function applyRecord(state, record) {
  const hyper = (record.spec && record.spec.hyperparameters) || {};
  return {
    ...state,
    id: record.id ?? state.id,
    name: record.name ?? record.intervention ?? state.name,
    status: record.status ?? state.status,
    error: record.error ?? null,
    losses: Array.isArray(record.losses) ? [...record.losses] : state.losses,
    validation: Array.isArray(record.validation_losses) ? validationPoints(record.validation_losses) : state.validation,
    progress: { ...state.progress, ...(record.progress || {}) },
    epochs: hyper.epochs ?? state.epochs,
    evaluation: record.evaluation ?? state.evaluation,
    resultVersion: record.result_version ?? state.resultVersion,
  };
}

// validation_losses: a number per epoch, or objects that name their epoch
function validationPoints(list) {
  return list
    .map((item, index) => (typeof item === "number"
      ? { epoch: index + 1, loss: item }
      : { epoch: item.epoch ?? index + 1, loss: item.validation_loss ?? item.loss, ...(item.step ? { step: item.step } : {}) }))
    .filter((point) => Number.isFinite(point.loss));
}

function applyStep(state, event) {
  const losses = [...state.losses];
  const index = Number.isInteger(event.step) ? event.step - 1 : losses.length;  // steps count from 1
  losses[index] = event.loss;
  const progress = { ...state.progress };
  for (const field of PROGRESS_FIELDS) if (event[field] !== undefined) progress[field] = event[field];
  return { ...state, losses, progress, status: state.status === "queued" ? "running" : state.status };
}

function applyEpoch(state, event) {
  const progress = { ...state.progress, epoch: event.epoch ?? state.progress.epoch };
  if (!Number.isFinite(event.validation_loss)) return { ...state, progress };
  const point = { epoch: event.epoch, loss: event.validation_loss };
  if (Number.isInteger(event.step)) point.step = event.step;
  const validation = [...state.validation.filter((p) => p.epoch !== event.epoch), point].sort((a, b) => a.epoch - b.epoch);
  return { ...state, validation, progress };
}

function applyStatus(state, event) {
  if (Array.isArray(event.losses)) return applyRecord(state, event);  // a status event carrying the whole record
  const next = { ...state, status: event.status ?? state.status };
  if (event.error !== undefined) next.error = event.error;
  if (event.result_version !== undefined) next.resultVersion = event.result_version;
  if (event.progress) next.progress = { ...state.progress, ...event.progress };
  if (event.evaluation) next.evaluation = event.evaluation;
  return next;
}

function withoutType(event) {
  const { type, ...rest } = event;
  return rest;
}

// The plot's series: training loss by step; validation loss at the step its epoch ended (given, or from the
// steps per epoch when the epoch count is a number).
export function plotSeries(state) {
  const train = [];
  state.losses.forEach((loss, index) => { if (Number.isFinite(loss)) train.push([index + 1, loss]); });
  const total = state.progress.total_steps;
  const perEpoch = Number.isInteger(state.epochs) && state.epochs > 0 && total ? total / state.epochs : null;
  const validation = state.validation
    .map((point) => [point.step ?? (perEpoch ? point.epoch * perEpoch : null), point.loss])
    .filter(([x]) => x !== null);
  const xMax = Math.max(total || 0, train.length, ...validation.map(([x]) => x));
  return { train, validation, xMax };
}
