//! Adam / AdamW with parameter groups, a warm-up + decay schedule and savable state.
//!
//! candle-nn's `AdamW` has one learning rate for all variables and no way to save its
//! moments, so `--resume` could not continue exactly and the backbone/head learning-rate
//! split (which the seed declared but never applied) could not be honoured.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{backprop::GradStore, DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How weight decay is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// PyTorch `Adam(weight_decay=…)`: decay added to the gradient (the seed's choice).
    Adam,
    /// Decoupled weight decay (Loshchilov & Hutter).
    Adamw,
}

/// Learning-rate decay after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum Schedule {
    Constant,
    Cosine,
    /// ×0.1 at 50% and 75% of training.
    Step,
}

/// Learning-rate multiplier at `step` of `total` (linear warm-up over `warmup` steps).
pub fn lr_factor(schedule: Schedule, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let t = ((step - warmup) as f64 / span).clamp(0.0, 1.0);
    match schedule {
        Schedule::Constant => 1.0,
        Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
        Schedule::Step => {
            if t >= 0.75 {
                0.01
            } else if t >= 0.5 {
                0.1
            } else {
                1.0
            }
        }
    }
}

/// Variables sharing a learning rate.
pub struct ParamGroup {
    pub name: &'static str,
    /// (checkpoint name, variable)
    pub vars: Vec<(String, Var)>,
    pub lr: f64,
}

struct Moments {
    m: Tensor,
    v: Tensor,
}

/// Adam(W) over several parameter groups.
pub struct Adam {
    kind: OptimizerKind,
    groups: Vec<ParamGroup>,
    moments: Vec<Vec<Moments>>,
    weight_decay: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    step: usize,
}

impl Adam {
    pub fn new(kind: OptimizerKind, groups: Vec<ParamGroup>, weight_decay: f64) -> Result<Self> {
        let mut moments = Vec::with_capacity(groups.len());
        for g in &groups {
            let mut ms = Vec::with_capacity(g.vars.len());
            for (_, v) in &g.vars {
                ms.push(Moments {
                    m: v.zeros_like()?,
                    v: v.zeros_like()?,
                });
            }
            moments.push(ms);
        }
        Ok(Self {
            kind,
            groups,
            moments,
            weight_decay,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 0,
        })
    }

    /// Number of trainable scalars.
    pub fn num_params(&self) -> usize {
        self.groups
            .iter()
            .flat_map(|g| g.vars.iter())
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// One update; `factor` scales every group's learning rate (the schedule).
    pub fn step(&mut self, grads: &GradStore, factor: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        for (g, ms) in self.groups.iter().zip(self.moments.iter_mut()) {
            let lr = g.lr * factor;
            for ((_, var), mo) in g.vars.iter().zip(ms.iter_mut()) {
                let Some(grad) = grads.get(var.as_tensor()) else {
                    continue;
                };
                // Detached: optimiser arithmetic must not extend the autograd graph (the
                // moments would otherwise chain every step's graph and leak memory).
                let grad = grad.detach();
                let w = &var.as_tensor().detach();
                let grad = match self.kind {
                    OptimizerKind::Adam if self.weight_decay > 0.0 => {
                        (grad + (w * self.weight_decay)?)?
                    }
                    _ => grad.clone(),
                };
                mo.m = ((&mo.m * self.beta1)? + (&grad * (1.0 - self.beta1))?)?;
                mo.v = ((&mo.v * self.beta2)? + (grad.sqr()? * (1.0 - self.beta2))?)?;
                let m_hat = (&mo.m / bc1)?;
                let v_hat = (&mo.v / bc2)?;
                let mut update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
                if self.kind == OptimizerKind::Adamw && self.weight_decay > 0.0 {
                    update = (update + (w * self.weight_decay)?)?;
                }
                var.set(&(w - (update * lr)?)?)?;
            }
        }
        Ok(())
    }

    /// Saves the moments (safetensors); the step count goes in the run state.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (g, ms) in self.groups.iter().zip(&self.moments) {
            for ((name, _), mo) in g.vars.iter().zip(ms) {
                map.insert(format!("m.{name}"), mo.m.clone());
                map.insert(format!("v.{name}"), mo.v.clone());
            }
        }
        candle_core::safetensors::save(&map, path).map_err(|e| Error::file(path, e))
    }

    /// Restores moments written by [`Adam::save`] for the same trainable variables.
    pub fn load(&mut self, path: &Path, step: usize) -> Result<()> {
        let device = self
            .groups
            .iter()
            .flat_map(|g| g.vars.first())
            .map(|(_, v)| v.device().clone())
            .next();
        let Some(device) = device else { return Ok(()) };
        let map =
            candle_core::safetensors::load(path, &device).map_err(|e| Error::file(path, e))?;
        for (g, ms) in self.groups.iter().zip(self.moments.iter_mut()) {
            for ((name, var), mo) in g.vars.iter().zip(ms.iter_mut()) {
                let get = |k: String| -> Result<Tensor> {
                    let t = map.get(&k).ok_or_else(|| {
                        Error::file(path, format!("optimizer state has no '{k}': the trainable layers differ from the run being resumed (same --freeze-until and --backbone?)"))
                    })?;
                    if t.dims() != var.dims() {
                        return Err(Error::file(
                            path,
                            format!(
                                "optimizer state '{k}' has shape {:?}, expected {:?}",
                                t.dims(),
                                var.dims()
                            ),
                        ));
                    }
                    Ok(t.to_dtype(DType::F32)?)
                };
                mo.m = get(format!("m.{name}"))?;
                mo.v = get(format!("v.{name}"))?;
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn warmup_then_cosine() {
        assert!((lr_factor(Schedule::Cosine, 0, 100, 10) - 0.1).abs() < 1e-12);
        assert!((lr_factor(Schedule::Cosine, 9, 100, 10) - 1.0).abs() < 1e-12);
        assert!((lr_factor(Schedule::Cosine, 10, 100, 10) - 1.0).abs() < 1e-12);
        assert!(lr_factor(Schedule::Cosine, 100, 100, 10).abs() < 1e-12);
        assert_eq!(lr_factor(Schedule::Step, 80, 100, 0), 0.01);
        assert_eq!(lr_factor(Schedule::Constant, 80, 100, 0), 1.0);
    }

    /// Matches PyTorch's Adam on f(w) = ½‖w‖² from w = 1 (first step moves by exactly lr).
    #[test]
    fn adam_first_step_moves_by_lr_and_groups_use_their_lr() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::from_vec(vec![1f32, -2.0], 2, &dev)?;
        let b = Var::from_vec(vec![3f32], 1, &dev)?;
        let groups = vec![
            ParamGroup {
                name: "backbone",
                vars: vec![("a".into(), a.clone())],
                lr: 0.1,
            },
            ParamGroup {
                name: "head",
                vars: vec![("b".into(), b.clone())],
                lr: 1.0,
            },
        ];
        let mut opt = Adam::new(OptimizerKind::Adam, groups, 0.0)?;
        let loss = ((a.as_tensor().sqr()?.sum_all()? + b.as_tensor().sqr()?.sum_all()?)? * 0.5)?;
        opt.step(&loss.backward()?, 1.0)?;
        let av = a.as_tensor().to_vec1::<f32>()?;
        let bv = b.as_tensor().to_vec1::<f32>()?;
        assert!(
            (av[0] - 0.9).abs() < 1e-5 && (av[1] + 1.9).abs() < 1e-5,
            "{av:?}"
        );
        assert!((bv[0] - 2.0).abs() < 1e-5, "{bv:?}");
        Ok(())
    }

    /// The moments must stay plain tensors: a tracked op chain would grow every step.
    #[test]
    fn moments_do_not_track_the_graph() -> Result<()> {
        let a = Var::from_vec(vec![1f32, -2.0], 2, &Device::Cpu)?;
        let mut opt = Adam::new(
            OptimizerKind::Adam,
            vec![ParamGroup {
                name: "g",
                vars: vec![("a".into(), a.clone())],
                lr: 0.1,
            }],
            1e-2,
        )?;
        for _ in 0..3 {
            let loss = a.as_tensor().sqr()?.sum_all()?;
            opt.step(&loss.backward()?, 1.0)?;
        }
        assert!(!opt.moments[0][0].m.track_op() && !opt.moments[0][0].v.track_op());
        Ok(())
    }

    #[test]
    fn state_round_trips() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::from_vec(vec![1f32, -2.0], 2, &dev)?;
        let mk = |a: &Var| -> Result<Adam> {
            Adam::new(
                OptimizerKind::Adamw,
                vec![ParamGroup {
                    name: "g",
                    vars: vec![("a".into(), a.clone())],
                    lr: 0.1,
                }],
                1e-2,
            )
        };
        let mut opt = mk(&a)?;
        let loss = a.as_tensor().sqr()?.sum_all()?;
        opt.step(&loss.backward()?, 1.0)?;
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("opt.safetensors");
        opt.save(&p)?;
        let mut other = mk(&a)?;
        other.load(&p, opt.steps_taken())?;
        assert_eq!(other.steps_taken(), 1);
        assert_eq!(
            other.moments[0][0].m.to_vec1::<f32>()?,
            opt.moments[0][0].m.to_vec1::<f32>()?
        );
        Ok(())
    }
}
